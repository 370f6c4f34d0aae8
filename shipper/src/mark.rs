//! Operator MARKs: crash-consistent markers, or application-consistent points taken
//! with file systems frozen (FIFREEZE) and optional pre/post hooks around the MARK.
//!
//! Order: pre hook, freeze every mount point, ask the producer for a MARK through the
//! ring header and wait until it is recorded, thaw, post hook. Frozen file systems have
//! flushed everything and accept no writes, so the MARK follows every write an
//! application finished before the freeze: replaying up to it gives the state the
//! hooks prepared. File systems are thawed on every path, errors included.

use crate::error::{Result, ShipperError};
use blkfilter::ring::RingControl;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// What to do around the MARK.
#[derive(Clone, Debug, Default)]
pub struct MarkOptions {
    pub app_consistent: bool,
    pub freeze: Vec<PathBuf>,
    pub pre: Option<String>,
    pub post: Option<String>,
    /// How long to wait for the producer to record the MARK.
    pub timeout: Duration,
}

/// A frozen file system; thawed when dropped.
struct Frozen {
    dir: File,
    path: PathBuf,
}

impl Frozen {
    fn freeze(path: &Path) -> Result<Frozen> {
        let dir = File::open(path)
            .map_err(|e| ShipperError::io(format!("opening mount point {}", path.display()), e))?;
        // SAFETY: FIFREEZE takes an int argument by value and touches no memory of ours;
        // the fd is open for the call's duration.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(ShipperError::io(
                format!(
                    "freezing {} (is it a mount point of a file system that supports freezing?)",
                    path.display()
                ),
                e,
            ));
        }
        Ok(Frozen {
            dir,
            path: path.into(),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as for FIFREEZE.
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW, 0) } < 0 {
            log::error!(
                "thawing {}: {}; run `fsfreeze -u {}`",
                self.path.display(),
                std::io::Error::last_os_error(),
                self.path.display()
            );
        }
    }
}

fn hook(which: &str, cmd: &str) -> Result<()> {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .map_err(|e| ShipperError::io(format!("running the {which} hook {cmd:?}"), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(ShipperError::io(
            format!("the {which} hook {cmd:?} failed ({status}); no MARK was recorded"),
            std::io::Error::other("hook failed"),
        ))
    }
}

/// Runs `action` inside the hooks and freezes of `options`: pre hook, freeze every
/// mount point, `action`, thaw (on every path), post hook.
pub fn around_frozen<T>(options: &MarkOptions, action: impl FnOnce() -> Result<T>) -> Result<T> {
    if let Some(pre) = &options.pre {
        hook("pre", pre)?;
    }
    let done = {
        let _frozen = options
            .freeze
            .iter()
            .map(|p| Frozen::freeze(p))
            .collect::<Result<Vec<_>>>()?;
        action()?
    };
    if let Some(post) = &options.post {
        hook("post", post)?;
    }
    Ok(done)
}

/// Polls `done` every 10 ms until it gives a value or `timeout` passes; `what` names
/// what was awaited in the error.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = done() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(ShipperError::io(
                what.to_string(),
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Takes a MARK on the volume whose ring is `ring`; returns its seq.
pub fn mark(ring: &Path, options: &MarkOptions) -> Result<u64> {
    let control = RingControl::open(ring)?;
    around_frozen(options, || {
        let number = control.request_mark(options.app_consistent);
        wait_for(
            options.timeout,
            &format!(
                "waiting for blkfilter to record the MARK in {} (is the volume attached?)",
                ring.display()
            ),
            || control.mark_recorded(number),
        )
    })
}
