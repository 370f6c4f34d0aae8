//! Running a recovery plan's hooks: `sh -c COMMAND` with stdin closed and output to
//! ours, in a process group of its own, so that a hook past its time limit goes with
//! everything it started (SIGTERM to the group, SIGKILL after [`HOOK_GRACE`]).
//!
//! A group of its own is outside the terminal's foreground group: Ctrl-C, a hang-up
//! or a SIGTERM to ublk-target would reach ublk-target alone. While a hook runs,
//! SIGINT, SIGTERM and SIGHUP are therefore passed on to its group before ublk-target
//! dies of them as it would have anyway; the handlers before are put back after. A hook
//! cannot read from the terminal (it would stop on SIGTTIN until its time is up), and
//! children that start a process group of their own (`setsid`, `timeout` without
//! `--foreground`) are not reached.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How often a running hook is checked on.
const HOOK_POLL: Duration = Duration::from_millis(20);
/// How long a hook past its time has between SIGTERM and SIGKILL.
pub const HOOK_GRACE: Duration = Duration::from_secs(5);
/// The signals passed on to a running hook's group.
const FORWARDED: [nix::sys::signal::Signal; 3] = [
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGHUP,
];

/// The process group of the hook running now, or 0.
static RUNNING_GROUP: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let group = RUNNING_GROUP.load(Ordering::SeqCst);
    // SAFETY: kill, signal and raise are async-signal-safe; the handler then ends the
    // process as the default action would have.
    unsafe {
        if group > 0 {
            libc::kill(-group, signal);
        }
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Runs `command` and fails unless it exits 0 within `timeout`.
pub fn run(command: &str, env: &[(String, String)], timeout: Duration) -> Result<(), String> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not run `sh -c {command}`: {e}"))?;
    // The group's id is the shell's pid (process_group(0)); it stays reserved until
    // the shell is reaped below.
    let group = child.id() as i32;
    RUNNING_GROUP.store(group, Ordering::SeqCst);
    let handler = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: `forward` only calls async-signal-safe functions; the previous handlers
    // are restored before returning.
    let before: Vec<_> = FORWARDED
        .iter()
        .filter_map(|&s| unsafe { sigaction(s, &handler) }.ok().map(|old| (s, old)))
        .collect();
    let kill_group = |signal: Signal| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-group), signal);
    };
    let started = Instant::now();
    let mut terminated_at = None;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) if terminated_at.is_none() => break Ok(status),
            Ok(Some(_)) => {
                break Err(format!(
                    "`{command}` did not finish within {:.1} s (hook_timeout_s) and was stopped",
                    timeout.as_secs_f64()
                ))
            }
            Ok(None) => match terminated_at {
                None if started.elapsed() < timeout => {}
                None => {
                    kill_group(Signal::SIGTERM);
                    terminated_at = Some(Instant::now());
                }
                Some(at) if at.elapsed() >= HOOK_GRACE => kill_group(Signal::SIGKILL),
                Some(_) => {}
            },
            Err(e) => {
                kill_group(Signal::SIGKILL);
                let _ = child.wait();
                break Err(format!("waiting for `{command}`: {e}"));
            }
        }
        std::thread::sleep(HOOK_POLL);
    };
    // What is left of the group once the shell is gone (a child that ignored SIGTERM).
    if terminated_at.is_some() {
        kill_group(Signal::SIGKILL);
    }
    RUNNING_GROUP.store(0, Ordering::SeqCst);
    for (signal, old) in before {
        // SAFETY: puts back the handler that was there before `run`.
        let _ = unsafe { sigaction(signal, &old) };
    }
    match outcome? {
        status if status.success() => Ok(()),
        status => Err(format!("`{command}` failed ({status})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` still runs (a zombie waiting for its new parent counts as gone).
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|s| !s.starts_with('Z'))
        })
    }

    fn gone_soon(pid: i32) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Runs a hook that starts `sleep 30` in the background (its pid in a file) and
    /// waits for it, with `prefix` first; returns the error and the sleep's pid.
    fn overrunning(prefix: &str, limit: Duration) -> (String, i32) {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let err = run(
            &format!("{prefix}sleep 30 & echo $! > {}; wait", pid_file.display()),
            &[],
            limit,
        )
        .unwrap_err();
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (err, pid)
    }

    #[test]
    fn a_hook_past_its_time_is_stopped_with_its_children() {
        let started = Instant::now();
        let (err, pid) = overrunning("", Duration::from_secs(2));
        assert!(err.contains("did not finish within 2.0 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(gone_soon(pid), "the hook's child {pid} survived");
    }

    #[test]
    fn a_hook_that_ignores_sigterm_is_killed_after_the_grace() {
        let started = Instant::now();
        // 3 s: time for sh to set its trap and write the pid before SIGTERM comes.
        let (err, pid) = overrunning("trap '' TERM; ", Duration::from_secs(3));
        assert!(err.contains("did not finish within 3.0 s"), "{err}");
        // Killed after the grace, not left to finish its 30 s (its children ignore
        // SIGTERM too).
        let took = started.elapsed();
        assert!(
            took >= HOOK_GRACE && took < Duration::from_secs(20),
            "{took:?}"
        );
        assert!(gone_soon(pid), "the hook's child {pid} survived");
    }

    #[test]
    fn exit_codes_are_reported() {
        run("exit 0", &[], Duration::from_secs(10)).unwrap();
        let err = run("exit 3", &[], Duration::from_secs(10)).unwrap_err();
        assert!(
            err.contains("`exit 3` failed") && err.contains('3'),
            "{err}"
        );
    }
}
