//! Alerts: an operator's command run when a volume's health changes, to page someone
//! or post to a chat. Both sides raise them: the shipper (`alert_command` in its
//! config, `--alert-command`) for what it sees of shipping, and `ublk-target apply
//! --follow` for how current the replica is at the recovery site, which is the only
//! one left to raise an alarm when the protected site goes dark.
//!
//! Contract:
//!
//! * The command runs through `sh -c` with the volume's news in its environment:
//!   `UBLK_DR_VOLUME`, `UBLK_DR_HEALTH` (Healthy, Warning, Critical),
//!   `UBLK_DR_PREVIOUS_HEALTH`, `UBLK_DR_STATE` (the status's one-line reason),
//!   `UBLK_DR_RPO_MS`, `UBLK_DR_SITE` (`source` or `recovery`: which side saw it),
//!   `UBLK_DR_HOST` (this machine's name).
//! * A new health is reported once it has held for the hold time (default 10 s), so a
//!   volume hovering at its RPO threshold does not page every few seconds; Critical is
//!   reported at once (the volume stopped shipping or applying). A health that comes
//!   back before the hold ends is not reported, and neither is its return.
//! * The first health seen is compared with Healthy: a volume that starts degraded
//!   (resyncing, say) is reported once it has held; one that starts Healthy is not.
//! * Commands run one at a time, in order, on a thread of their own, never in the
//!   shipping or applying path; one that runs longer than [`COMMAND_TIMEOUT`] is killed
//!   with its process group. A failing command is logged, nothing else. Alerts still
//!   queued when [`Alerts`] is dropped are run first, within [`DRAIN_LIMIT`] (a
//!   stopping service must not outlast systemd's stop timeout); what does not fit is
//!   logged as not sent.

use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A volume's health, as either side judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Healthy,
    Warning,
    Critical,
}

impl Health {
    /// The Prometheus gauge value: 0 Healthy, 1 Warning, 2 Critical.
    pub fn gauge(self) -> f64 {
        match self {
            Health::Healthy => 0.0,
            Health::Warning => 1.0,
            Health::Critical => 2.0,
        }
    }
}

/// Which side raised an alert (`UBLK_DR_SITE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// The shipper, at the protected volume.
    Source,
    /// `ublk-target apply`, at the replica.
    Recovery,
}

impl Site {
    fn name(self) -> &'static str {
        match self {
            Site::Source => "source",
            Site::Recovery => "recovery",
        }
    }
}

/// How long a new health must hold before it is reported, by default.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(10);

/// Longest an alert command may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the alerts still queued may take once the pipeline has ended.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// One health change to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub volume: String,
    pub previous: Health,
    pub health: Health,
    pub state: String,
    pub rpo_ms: u64,
}

/// Decides when a health change is reported (no I/O: fed the status and the time).
#[derive(Debug)]
pub struct HealthWatch {
    hold: Duration,
    /// The last health reported (Healthy before any).
    reported: Health,
    /// A different health seen, and since when.
    pending: Option<(Health, Instant)>,
}

impl HealthWatch {
    pub fn new(hold: Duration) -> HealthWatch {
        HealthWatch {
            hold,
            reported: Health::Healthy,
            pending: None,
        }
    }

    /// Takes `volume`'s health at `now`; returns the alert to send, if one is due.
    /// `state` (the one-line reason) is asked for only then.
    pub fn observe(
        &mut self,
        volume: &str,
        health: Health,
        rpo_ms: u64,
        state: impl FnOnce() -> String,
        now: Instant,
    ) -> Option<Alert> {
        if health == self.reported {
            self.pending = None;
            return None;
        }
        let since = match self.pending {
            Some((pending, since)) if pending == health => since,
            _ => now,
        };
        self.pending = Some((health, since));
        if health != Health::Critical && now.saturating_duration_since(since) < self.hold {
            return None;
        }
        let previous = std::mem::replace(&mut self.reported, health);
        self.pending = None;
        Some(Alert {
            volume: volume.to_string(),
            previous,
            health,
            state: state(),
            rpo_ms,
        })
    }
}

/// A volume's alerts: its [`HealthWatch`] and the thread that runs the command.
pub struct Alerts {
    watch: HealthWatch,
    queue: Option<Sender<Alert>>,
    runner: Option<JoinHandle<()>>,
    /// Set when dropped: no command runs past it.
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Alerts {
    /// Alerts that run `command` (none: changes are only logged) after `hold`, as
    /// raised at `site`.
    pub fn new(command: Option<String>, hold: Duration, site: Site) -> Alerts {
        let deadline = Arc::new(Mutex::new(None::<Instant>));
        let (queue, runner) = match command {
            Some(command) => {
                let (tx, rx) = channel::<Alert>();
                let deadline = deadline.clone();
                let runner = std::thread::Builder::new()
                    .name("alert".into())
                    .spawn(move || {
                        for alert in rx {
                            let until = *deadline.lock().expect("deadline lock");
                            if until.is_some_and(|d| Instant::now() >= d) {
                                log::warn!(
                                    "volume {}: alert {:?} -> {:?} not sent: stopping",
                                    alert.volume,
                                    alert.previous,
                                    alert.health
                                );
                                continue;
                            }
                            run_command(&command, &alert, site, &deadline);
                        }
                    })
                    .expect("spawning the alert thread");
                (Some(tx), Some(runner))
            }
            None => (None, None),
        };
        Alerts {
            watch: HealthWatch::new(hold),
            queue,
            runner,
            deadline,
        }
    }

    /// Takes `volume`'s health as it is now (see [`HealthWatch::observe`]).
    pub fn observe(
        &mut self,
        volume: &str,
        health: Health,
        rpo_ms: u64,
        state: impl FnOnce() -> String,
    ) {
        let Some(alert) = self
            .watch
            .observe(volume, health, rpo_ms, state, Instant::now())
        else {
            return;
        };
        let line = format!(
            "volume {}: health {:?} -> {:?}: {}",
            alert.volume, alert.previous, alert.health, alert.state
        );
        match alert.health {
            Health::Healthy => log::info!("{line}"),
            Health::Warning | Health::Critical => log::warn!("{line}"),
        }
        if let Some(queue) = &self.queue {
            let _ = queue.send(alert);
        }
    }
}

impl Drop for Alerts {
    /// Runs the alerts still queued, then ends the thread.
    fn drop(&mut self) {
        *self.deadline.lock().expect("deadline lock") = Some(Instant::now() + DRAIN_LIMIT);
        self.queue = None;
        if let Some(runner) = self.runner.take() {
            let _ = runner.join();
        }
    }
}

/// Runs the alert command for `alert`, killing it (and whatever it started) after
/// [`COMMAND_TIMEOUT`] or at the `deadline` a stopping service sets meanwhile,
/// whichever comes first.
fn run_command(command: &str, alert: &Alert, site: Site, deadline: &Mutex<Option<Instant>>) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("UBLK_DR_VOLUME", &alert.volume)
        .env("UBLK_DR_HEALTH", format!("{:?}", alert.health))
        .env("UBLK_DR_PREVIOUS_HEALTH", format!("{:?}", alert.previous))
        .env("UBLK_DR_STATE", &alert.state)
        .env("UBLK_DR_RPO_MS", alert.rpo_ms.to_string())
        .env("UBLK_DR_SITE", site.name())
        .env("UBLK_DR_HOST", host)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            log::error!(
                "volume {}: alert command {command:?} did not start: {e}",
                alert.volume
            );
            return;
        }
    };
    let timeout = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let until = deadline
            .lock()
            .expect("deadline lock")
            .map_or(timeout, |d| d.min(timeout));
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                log::warn!(
                    "volume {}: alert command {command:?} failed: {status}",
                    alert.volume
                );
                return;
            }
            Ok(None) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                // The command's process group: sh and whatever it started.
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                log::warn!(
                    "volume {}: alert command {command:?} ran too long and was killed",
                    alert.volume
                );
                return;
            }
            Err(e) => {
                log::warn!(
                    "volume {}: waiting for alert command {command:?}: {e}",
                    alert.volume
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `alerts` is told of vol0 in `health`.
    fn observe(alerts: &mut Alerts, health: Health) {
        let (rpo_ms, state) = reading(health);
        alerts.observe("vol0", health, rpo_ms, || state.to_string());
    }

    fn reading(health: Health) -> (u64, &'static str) {
        match health {
            Health::Healthy => (0, "shipping"),
            Health::Warning => (5000, "RPO 5.0s over its threshold"),
            Health::Critical => (0, "stopped shipping: broken chain"),
        }
    }

    #[test]
    fn a_change_is_reported_once_it_has_held_and_critical_at_once() {
        let hold = Duration::from_secs(10);
        let mut watch = HealthWatch::new(hold);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let seen = |watch: &mut HealthWatch, h: Health, ms: u64| {
            let (rpo_ms, state) = reading(h);
            watch
                .observe("vol0", h, rpo_ms, || state.into(), at(ms))
                .map(|a| (a.previous, a.health))
        };
        assert_eq!(
            seen(&mut watch, Health::Healthy, 0),
            None,
            "Healthy at start"
        );
        // A Warning that clears within the hold: nothing, either way.
        assert_eq!(seen(&mut watch, Health::Warning, 1_000), None);
        assert_eq!(seen(&mut watch, Health::Warning, 9_000), None);
        assert_eq!(seen(&mut watch, Health::Healthy, 10_500), None);
        // One that holds: reported once, when the hold is over.
        assert_eq!(seen(&mut watch, Health::Warning, 20_000), None);
        assert_eq!(seen(&mut watch, Health::Warning, 29_999), None);
        assert_eq!(
            seen(&mut watch, Health::Warning, 30_000),
            Some((Health::Healthy, Health::Warning))
        );
        assert_eq!(seen(&mut watch, Health::Warning, 45_000), None);
        // Back to Healthy, held: reported.
        assert_eq!(seen(&mut watch, Health::Healthy, 50_000), None);
        assert_eq!(
            seen(&mut watch, Health::Healthy, 60_000),
            Some((Health::Warning, Health::Healthy))
        );
        // Critical: at once, and once.
        let alert = watch
            .observe(
                "vol0",
                Health::Critical,
                0,
                || "broken chain".into(),
                at(61_000),
            )
            .unwrap();
        assert_eq!(
            (alert.previous, alert.health),
            (Health::Healthy, Health::Critical)
        );
        assert!(alert.state.contains("broken chain"), "{}", alert.state);
        assert_eq!(seen(&mut watch, Health::Critical, 62_000), None);
    }

    #[test]
    fn a_hanging_command_does_not_hold_up_the_end_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-alive");
        // sh starts a child that outlives it unless its group is killed.
        let command = format!("(sleep 60; touch {}) & wait", marker.display());
        let mut alerts = Alerts::new(Some(command), Duration::ZERO, Site::Source);
        observe(&mut alerts, Health::Warning);
        observe(&mut alerts, Health::Critical);
        // Returns (at the drain limit; a hang here would never end the test), the
        // second alert not run, and the killed group took sh's child with it: nothing
        // of the command is left in the process table.
        drop(alerts);
        // A killed process keeps its command line until it is scheduled to exit; one
        // that survived would still be there after its 60 s.
        let marker = marker.display().to_string();
        let gone = (0..250).any(|_| {
            let ps = Command::new("pgrep")
                .args(["-f", &marker])
                .output()
                .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            ps.stdout.is_empty()
        });
        assert!(gone, "the command's child survived");
    }

    #[test]
    fn the_command_gets_the_change_in_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("alerts");
        let command = format!(
            "echo \"$UBLK_DR_SITE $UBLK_DR_VOLUME $UBLK_DR_PREVIOUS_HEALTH $UBLK_DR_HEALTH $UBLK_DR_RPO_MS $UBLK_DR_STATE\" >> {}",
            out.display()
        );
        let mut alerts = Alerts::new(Some(command), Duration::ZERO, Site::Source);
        observe(&mut alerts, Health::Warning);
        observe(&mut alerts, Health::Critical);
        drop(alerts); // runs what is queued
        let text = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].starts_with("source vol0 Healthy Warning 5000 RPO"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("source vol0 Warning Critical 0 stopped shipping: broken chain"),
            "{text}"
        );
    }
}
