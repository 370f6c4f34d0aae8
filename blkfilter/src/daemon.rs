//! Running a ublk server in the foreground or as a daemon that reports back.
//!
//! Daemonized, the caller forks; the parent waits on a pipe until the child reports the
//! device live (`ok ID`) or its error, then prints `/dev/ublkbID` or fails with that
//! error. Scripts can use the device as soon as the command returns, and a failure to
//! start is an error of the command itself, not a line in a log.

use anyhow::{Context, Result};
use std::fmt::Display;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

/// Called by the server once the device is live, with its id.
pub type Ready = Box<dyn FnOnce(u32) + Send + Sync>;

/// Runs `serve` in the foreground, or forks it into the background (logging to `log`)
/// and prints the device's path once it is live.
///
/// Call it before the process starts any thread: the child of `fork` continues with
/// arbitrary code.
pub fn run_server<E: Display>(
    foreground: bool,
    log: &Path,
    serve: impl FnOnce(Ready) -> Result<(), E>,
) -> Result<()> {
    if foreground {
        let ready: Ready = Box::new(|id| {
            println!("/dev/ublkb{id} is live");
            let _ = std::io::stdout().flush();
        });
        return serve(ready).map_err(|e| anyhow::anyhow!("{e}"));
    }
    let id = spawn_server(log, serve)?;
    println!("/dev/ublkb{id}");
    Ok(())
}

/// Forks `serve` into the background (logging to `log`) and returns the device's id
/// once it is live, or the server's error. Same rule as [`run_server`]: no thread may
/// have been started yet.
pub fn spawn_server<E: Display>(
    log: &Path,
    serve: impl FnOnce(Ready) -> Result<(), E>,
) -> Result<u32> {
    let (read_end, write_end) = nix::unistd::pipe().context("creating a pipe")?;
    // SAFETY: the caller guarantees this process is still single-threaded, so the child
    // may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write_end);
            let mut report = String::new();
            std::fs::File::from(read_end)
                .read_to_string(&mut report)
                .context("reading the server's report")?;
            match report.strip_prefix("ok ") {
                Some(id) => id
                    .trim()
                    .parse()
                    .with_context(|| format!("the server reported {report:?}")),
                None if report.is_empty() => anyhow::bail!(
                    "the server exited before the device was live; see {}",
                    log.display()
                ),
                None => anyhow::bail!("{}", report.trim_start_matches("error: ").trim()),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            let report = std::sync::Mutex::new(Some(std::fs::File::from(write_end)));
            let report = std::sync::Arc::new(report);
            let for_ready = report.clone();
            let _ = nix::unistd::setsid();
            redirect_output(log);
            let ready: Ready = Box::new(move |id| {
                if let Some(mut pipe) = for_ready.lock().ok().and_then(|mut p| p.take()) {
                    let _ = writeln!(pipe, "ok {id}");
                }
            });
            let result = serve(ready);
            if let Err(e) = &result {
                log::error!("{e}");
                if let Some(mut pipe) = report.lock().ok().and_then(|mut p| p.take()) {
                    let _ = writeln!(pipe, "error: {e}");
                }
            }
            std::process::exit(if result.is_ok() { 0 } else { 1 });
        }
    }
}

/// Points the daemon's stdin at /dev/null and stdout/stderr at its log file.
fn redirect_output(log: &Path) {
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let null = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .ok()
        .map(OwnedFd::from);
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors with fds we own; nothing else in this
    // (single-threaded) process is using them concurrently.
    unsafe {
        if let Some(null) = &null {
            libc::dup2(null.as_raw_fd(), 0);
        }
        // Without a log, /dev/null: the caller's stdout (maybe a pipe it reads to the
        // end) must not stay open for as long as the server lives.
        if let Some(out) = out.as_ref().or(null.as_ref()) {
            libc::dup2(out.as_raw_fd(), 1);
            libc::dup2(out.as_raw_fd(), 2);
        }
    }
}
