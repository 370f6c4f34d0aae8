//! Upload bandwidth limit: one budget shared by every volume a shipper process ships,
//! with optional windows of the week that set another limit (work hours on a WAN link),
//! as ASR's and Zerto's throttling and DRBD's `c-max-rate` offer.
//!
//! ```toml
//! [throttle]
//! limit = "200Mbit/s"            # outside the windows (default: unlimited)
//! [[throttle.window]]            # the first window that holds the local time wins
//! days = "mon-fri"               # default: every day
//! hours = "08:00-18:00"          # may cross midnight: "22:00-06:00"
//! limit = "50Mbit/s"
//! ```
//!
//! Contract:
//!
//! * Uploads take consecutive slots of `bytes / limit` on one virtual clock shared by
//!   every uploader of the process, and by every shipper process of one config file
//!   through a mapped clock file (`<status_dir>/throttle.clock`: the systemd units run
//!   a process per volume), and an upload starts no earlier than its slot
//!   ([`LinkClock::reserve`]). Between the starts of any two uploads, at most `limit` times
//!   the time between them was started: the first upload after an idle spell goes at
//!   once, so the link sees at most one segment at line speed before the limit holds.
//! * The unit is a segment (at most `max_segment_bytes`): averaged over a few
//!   segments the rate is the limit, within one the link runs at its own speed.
//! * A new limit (a window beginning or ending, or [`Throttle::set_policy`] on SIGHUP)
//!   counts from the moment it is seen: the first process to see it restarts the
//!   clock, and slots are given again from then, including those of uploads already
//!   waiting. A process starting, or seeing a limit the clock already runs at, joins
//!   the queue instead.
//! * The clock file is opened the first time a limit applies; if it cannot be, the
//!   limit holds for the process alone, with an error logged: uploads never stop for
//!   the throttle's sake.
//! * Waiting ends early when the pipeline stops, so SIGTERM is not held up by it.
//! * Every attempt is charged: a retried upload sends the segment again.
//! * Windows are in local time (the shipper's `TZ`, else /etc/localtime); a window
//!   crossing midnight belongs to the day it starts on.

use memmap2::{MmapOptions, MmapRaw};
use serde::Deserialize;
use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How often a waiting upload looks again (stop, a new limit).
const TICK: Duration = Duration::from_millis(100);

/// A bandwidth limit, in bytes per second (never 0: "no limit" is `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    bytes_per_s: u64,
}

impl Rate {
    /// `None` for 0 (no limit).
    pub fn new(bytes_per_s: u64) -> Option<Rate> {
        (bytes_per_s > 0).then_some(Rate { bytes_per_s })
    }

    pub fn bytes_per_s(self) -> u64 {
        self.bytes_per_s
    }

    /// How long `bytes` take at this rate.
    fn time_for(self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_s as f64)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bytes_per_s as f64;
        write!(f, "{:.2} MB/s ({:.1} Mbit/s)", b / 1e6, b * 8.0 / 1e6)
    }
}

/// Parses a limit: a number and a unit, `/s` optional: bytes (`B`, `kB`, `MB`, `GB`,
/// `KiB`, `MiB`, `GiB`) or bits (`kbit`, `Mbit`, `Gbit`; `bps`, `kbps`, `Mbps`, `Gbps`),
/// or `unlimited` (`None`).
pub fn parse_limit(text: &str) -> Result<Option<Rate>, String> {
    let bad = |why: &str| {
        format!(
            "upload limit {text:?}: {why} (write a number and a unit, such as \"50MiB/s\", \
             \"400Mbit/s\" or \"1Gbps\", or \"unlimited\")"
        )
    };
    let t = text.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad("no unit"))?;
    let (number, unit) = (&t[..split], t[split..].trim());
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let scale = match unit {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "bit" | "bps" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kbps" | "Kbps" => 1e3 / 8.0,
        "Mbit" | "Mbps" => 1e6 / 8.0,
        "Gbit" | "Gbps" => 1e9 / 8.0,
        "" => return Err(bad("no unit")),
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    let bytes_per_s = (value * scale).round();
    if bytes_per_s < 1.0 {
        return Err(bad(
            "below one byte per second; \"unlimited\" means no limit",
        ));
    }
    Ok(Some(Rate {
        bytes_per_s: bytes_per_s as u64,
    }))
}

/// The `[throttle]` table of the config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// The limit outside the windows; unlimited when absent.
    pub limit: Option<String>,
    #[serde(default, rename = "window")]
    pub windows: Vec<WindowConfig>,
}

/// A `[[throttle.window]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub days: Option<String>,
    pub hours: String,
    pub limit: String,
}

/// A time of the week in local time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Monday … 6 = Sunday.
    pub weekday: u8,
    /// Minutes since midnight.
    pub minute: u16,
}

impl LocalTime {
    /// The local time now (`TZ`, else /etc/localtime).
    pub fn now() -> LocalTime {
        let t: libc::time_t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as libc::time_t);
        // SAFETY: an all-zero tm is a valid value for localtime_r to overwrite.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live locals; localtime_r is the thread-safe form
        // and writes only to `tm`.
        if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
            log::warn!("localtime_r failed: throttle windows read UTC");
            let days = t / 86_400;
            return LocalTime {
                // 1970-01-01 was a Thursday (3).
                weekday: ((days + 3).rem_euclid(7)) as u8,
                minute: ((t.rem_euclid(86_400)) / 60) as u16,
            };
        }
        LocalTime {
            // tm_wday counts from Sunday.
            weekday: ((tm.tm_wday + 6) % 7) as u8,
            minute: (tm.tm_hour * 60 + tm.tm_min) as u16,
        }
    }
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A window of the week with its own limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Indexed by weekday, 0 = Monday.
    days: [bool; 7],
    /// Minutes since midnight; `to <= from` crosses midnight.
    from: u16,
    to: u16,
    limit: Option<Rate>,
    /// As written in the config, for status and logs.
    label: String,
}

impl Window {
    fn parse(config: &WindowConfig) -> Result<Window, String> {
        let days_text = config.days.as_deref().unwrap_or("mon-sun");
        let label = format!("{days_text} {}", config.hours);
        let days = parse_days(days_text).map_err(|e| format!("window {label}: {e}"))?;
        let (from, to) = parse_hours(&config.hours).map_err(|e| format!("window {label}: {e}"))?;
        let limit = parse_limit(&config.limit).map_err(|e| format!("window {label}: {e}"))?;
        Ok(Window {
            days,
            from,
            to,
            limit,
            label,
        })
    }

    fn holds(&self, at: LocalTime) -> bool {
        let day = usize::from(at.weekday);
        if self.from < self.to {
            self.days[day] && (self.from..self.to).contains(&at.minute)
        } else {
            // Crosses midnight: the evening part on a listed day, the morning part on
            // the day after a listed day.
            let yesterday = (day + 6) % 7;
            (self.days[day] && at.minute >= self.from)
                || (self.days[yesterday] && at.minute < self.to)
        }
    }
}

/// `mon-fri`, `sat,sun`, `mon-wed,fri`, `mon-sun` (a range may wrap: `fri-mon`).
fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                format!("days: unknown day {name:?} (use mon, tue, wed, thu, fri, sat, sun)")
            })
    };
    let mut days = [false; 7];
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (day(first)?, day(last)?);
                let mut d = first;
                loop {
                    days[d] = true;
                    if d == last {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(part)?] = true,
        }
    }
    Ok(days)
}

/// `HH:MM-HH:MM`, the end may be `24:00`; returns minutes since midnight.
fn parse_hours(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("hours {text:?}: write HH:MM-HH:MM, such as \"08:00-18:00\"");
    let minute = |t: &str| -> Result<u16, String> {
        let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h > 24 || (h == 24 && m > 0) {
            return Err(bad());
        }
        Ok(h * 60 + m)
    };
    let (from, to) = text.split_once('-').ok_or_else(bad)?;
    let (from, to) = (minute(from)?, minute(to)?);
    if from == to || from == 24 * 60 {
        return Err(format!(
            "hours {text:?}: the window is empty (for a whole day write \"00:00-24:00\")"
        ));
    }
    Ok((from, to % (24 * 60)))
}

/// What limits uploads when: a default and windows, the first that holds winning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    default: Option<Rate>,
    windows: Vec<Window>,
}

impl Policy {
    /// No limit at any time.
    pub fn unlimited() -> Policy {
        Policy::default()
    }

    /// One limit at all times.
    pub fn constant(limit: Option<Rate>) -> Policy {
        Policy {
            default: limit,
            windows: Vec::new(),
        }
    }

    /// Checks a `[throttle]` table; the error names what to fix.
    pub fn from_config(config: &ThrottleConfig) -> Result<Policy, String> {
        let default = match &config.limit {
            Some(limit) => parse_limit(limit)?,
            None => None,
        };
        let windows = config
            .windows
            .iter()
            .map(Window::parse)
            .collect::<Result<_, _>>()?;
        Ok(Policy { default, windows })
    }

    /// The limit at `at`, and the window that set it (`None`: the default).
    pub fn limit_at(&self, at: LocalTime) -> (Option<Rate>, Option<&str>) {
        match self.windows.iter().find(|w| w.holds(at)) {
            Some(w) => (w.limit, Some(&w.label)),
            None => (self.default, None),
        }
    }
}

/// The link's virtual clock: where the last slot given out ends, a generation bumped
/// by every restart, and the limit it was restarted for, words of memory in ns of
/// `CLOCK_MONOTONIC` (one clock for every process of the host). [`LinkClock::shared`]
/// maps them from a file, so every shipper process using that file shares one budget.
/// A fresh clock is all zeroes; one left from an earlier boot (its boot id differs) is
/// zeroed when opened, as its times belong to that boot's monotonic clock.
#[derive(Debug)]
struct LinkClock {
    map: MmapRaw,
}

const CLOCK_MAGIC: [u8; 8] = *b"UBDRTHR1";
const CLOCK_BYTES: usize = 64;
const OFF_NEXT_FREE: usize = 8;
const OFF_GENERATION: usize = 16;
/// Bytes per second of the limit the clock was last restarted for; 0: none.
const OFF_RATE: usize = 24;
/// The boot the times belong to: /proc/sys/kernel/random/boot_id's 32 hex digits.
const OFF_BOOT_ID: usize = 32;

impl LinkClock {
    /// A clock only this process uses.
    fn private() -> std::io::Result<LinkClock> {
        let map = MmapOptions::new().len(CLOCK_BYTES).map_anon()?;
        Ok(LinkClock { map: map.into() })
    }

    /// The clock in file `path`, created (atomically: the finished file is linked in)
    /// when missing.
    fn shared(path: &Path) -> Result<LinkClock, String> {
        let failed = |what: &str, e: std::io::Error| {
            format!("upload throttle clock {}: {what}: {e}", path.display())
        };
        if !path.exists() {
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            let mut head = [0u8; CLOCK_BYTES];
            head[..8].copy_from_slice(&CLOCK_MAGIC);
            let made = std::fs::write(&tmp, head).and_then(|()| {
                match std::fs::hard_link(&tmp, path) {
                    // Another shipper made it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    other => other,
                }
            });
            let _ = std::fs::remove_file(&tmp);
            made.map_err(|e| failed("creating it", e))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| failed("opening it", e))?;
        let mut head = [0u8; 8];
        let len = file.metadata().map_err(|e| failed("stat", e))?.len();
        if len != CLOCK_BYTES as u64
            || file.read_exact_at(&mut head, 0).is_err()
            || head != CLOCK_MAGIC
        {
            return Err(format!(
                "{} is not an upload throttle clock ({len} bytes, no magic): stop every \
                 shipper of this config, remove it, and start them again",
                path.display()
            ));
        }
        let map = MmapOptions::new()
            .map_raw(&file)
            .map_err(|e| failed("mapping it", e))?;
        let clock = LinkClock { map };
        let boot_id = boot_id();
        let mut recorded = [0u8; 32];
        file.read_exact_at(&mut recorded, OFF_BOOT_ID as u64)
            .map_err(|e| failed("reading it", e))?;
        if recorded != boot_id {
            // Shippers starting together after a reboot may each do this: all at the
            // start, before any slot matters.
            clock.word(OFF_RATE).store(0, Ordering::Release);
            clock.restart(0);
            file.write_all_at(&boot_id, OFF_BOOT_ID as u64)
                .map_err(|e| failed("writing it", e))?;
        }
        Ok(clock)
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= OFF_BOOT_ID && self.map.len() == CLOCK_BYTES);
        // SAFETY: the mapping is page-aligned and CLOCK_BYTES long (a shared file is
        // mapped only after its length was checked, and is never truncated by a
        // shipper), so this is an aligned, in-bounds u64 living as long as the borrow
        // of `self`. Every process mapping the clock reaches these words only
        // atomically, and AtomicU64 is lock-free on the 64-bit targets this runs on,
        // so processes sharing the page agree on them.
        unsafe { &*self.map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn generation(&self) -> u64 {
        self.word(OFF_GENERATION).load(Ordering::Acquire)
    }

    /// Takes the clock over for a new limit, unless some process already restarted it
    /// for that limit: true when this call did.
    fn switch_rate(&self, bytes_per_s: u64) -> bool {
        let rate = self.word(OFF_RATE);
        let current = rate.load(Ordering::Acquire);
        current != bytes_per_s
            && rate
                .compare_exchange(current, bytes_per_s, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Gives out slots from `now` on, voiding those given out before (a new limit).
    /// The generation moves after the clock, so a slot taken in between is taken
    /// again rather than kept from the old clock.
    fn restart(&self, now: u64) {
        self.word(OFF_NEXT_FREE).store(now, Ordering::Release);
        self.word(OFF_GENERATION).fetch_add(1, Ordering::AcqRel);
    }

    /// The start of the next slot, `length` ns long, at `now` or after the last one.
    fn reserve(&self, length: u64, now: u64) -> u64 {
        let next_free = self.word(OFF_NEXT_FREE);
        let mut seen = next_free.load(Ordering::Acquire);
        loop {
            let start = seen.max(now);
            match next_free.compare_exchange_weak(
                seen,
                start.saturating_add(length),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return start,
                Err(now_seen) => seen = now_seen,
            }
        }
    }
}

/// This boot's id (32 hex digits), or zeroes where the kernel does not tell it.
fn boot_id() -> [u8; 32] {
    let mut id = [0u8; 32];
    if let Ok(text) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        for (slot, digit) in id
            .iter_mut()
            .zip(text.bytes().filter(u8::is_ascii_hexdigit))
        {
            *slot = digit;
        }
    }
    id
}

/// Now, in ns of `CLOCK_MONOTONIC`: the same clock in every process.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// A process's upload limit, shared by the uploaders of its volumes, and through a
/// clock file ([`Throttle::shared`]) with other shipper processes.
#[derive(Debug)]
pub struct Throttle {
    policy: Mutex<Policy>,
    /// The limit this process saw last: a change restarts the clock, unless another
    /// process sharing it already did for the same limit.
    seen: Mutex<Option<Rate>>,
    /// The clock file to share, if any; opened the first time a limit applies.
    clock_path: Option<PathBuf>,
    clock: OnceLock<LinkClock>,
}

impl Throttle {
    /// A throttle of this process alone.
    pub fn new(policy: Policy) -> Throttle {
        Throttle {
            policy: Mutex::new(policy),
            seen: Mutex::new(None),
            clock_path: None,
            clock: OnceLock::new(),
        }
    }

    pub fn unlimited() -> Throttle {
        Throttle::new(Policy::unlimited())
    }

    /// A throttle sharing its budget with every process using the clock file `path`
    /// (created the first time a limit applies). Processes should share a policy:
    /// each takes slots at its own limit. Should the file be unusable, the limit
    /// holds for this process alone and an error is logged: uploads never stop for
    /// the sake of the throttle.
    pub fn shared(policy: Policy, path: &Path) -> Throttle {
        Throttle {
            clock_path: Some(path.to_path_buf()),
            ..Throttle::new(policy)
        }
    }

    /// Replaces the policy (a config reload); uploads waiting get new slots.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.lock().expect("throttle policy lock") = policy;
    }

    /// The limit now and what set it: a window's label, or `None` for the default.
    pub fn limit_now(&self) -> (Option<Rate>, Option<String>) {
        let policy = self.policy.lock().expect("throttle policy lock");
        let (limit, window) = policy.limit_at(LocalTime::now());
        (limit, window.map(str::to_string))
    }

    fn clock(&self) -> &LinkClock {
        self.clock.get_or_init(|| {
            let private = || LinkClock::private().expect("mapping 64 bytes of anonymous memory");
            match &self.clock_path {
                Some(path) => LinkClock::shared(path).unwrap_or_else(|e| {
                    log::error!("{e}; the upload limit holds for this process alone");
                    private()
                }),
                None => private(),
            }
        })
    }

    /// Waits until an upload of `bytes` may start and returns how long it slept for
    /// that; `None` if `stopping` turned true first.
    pub fn admit(&self, bytes: u64, stopping: impl Fn() -> bool) -> Option<Duration> {
        let mut slept = Duration::ZERO;
        // The slot's start and the clock's generation when it was given.
        let mut slot: Option<(u64, u64)> = None;
        loop {
            let limit = self.limit_now().0;
            let now = monotonic_ns();
            {
                let mut seen = self.seen.lock().expect("throttle lock");
                if *seen != limit {
                    *seen = limit;
                    if self.clock().switch_rate(limit.map_or(0, Rate::bytes_per_s)) {
                        self.clock().restart(now);
                    }
                }
            }
            let Some(rate) = limit else {
                return Some(slept);
            };
            let clock = self.clock();
            let generation = clock.generation();
            let start = match slot {
                Some((start, given)) if given == generation => start,
                _ => {
                    let length = rate.time_for(bytes).as_nanos() as u64;
                    let start = clock.reserve(length, now);
                    slot = Some((start, generation));
                    start
                }
            };
            if start <= now {
                return Some(slept);
            }
            if stopping() {
                return None;
            }
            let nap = Duration::from_nanos(start - now).min(TICK);
            std::thread::sleep(nap);
            slept += nap;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn rate(bytes_per_s: u64) -> Option<Rate> {
        Some(Rate { bytes_per_s })
    }

    #[test]
    fn limits_parse_in_bytes_and_bits() {
        for (text, expect) in [
            ("50MiB/s", rate(50 << 20)),
            ("50 MiB", rate(50 << 20)),
            ("400Mbit/s", rate(50_000_000)),
            ("1Gbps", rate(125_000_000)),
            ("1.5MB/s", rate(1_500_000)),
            ("64kbit", rate(8_000)),
            ("8bps", rate(1)),
            ("unlimited", None),
            (" Unlimited ", None),
        ] {
            assert_eq!(parse_limit(text), Ok(expect), "{text}");
        }
        for (text, says) in [
            ("50", "no unit"),
            ("50/s", "no unit"),
            ("fast", "not a number"),
            ("50 Mb/s", "unknown unit \"Mb\""),
            ("0MB/s", "below one byte"),
            ("1bit", "below one byte"),
            ("", "no unit"),
        ] {
            let e = parse_limit(text).unwrap_err();
            assert!(e.contains(says) && e.contains("400Mbit/s"), "{text}: {e}");
        }
    }

    #[test]
    fn days_and_hours_parse_or_say_what_is_wrong() {
        let days = |t| parse_days(t).map(|d| d.iter().filter(|&&b| b).count());
        assert_eq!(days("mon-fri"), Ok(5));
        assert_eq!(days("sat,sun"), Ok(2));
        assert_eq!(days("fri-mon"), Ok(4));
        assert_eq!(days("mon-wed, fri"), Ok(4));
        assert_eq!(days("mon-sun"), Ok(7));
        assert!(parse_days("weekdays").unwrap_err().contains("unknown day"));
        assert_eq!(parse_hours("08:00-18:30"), Ok((480, 1110)));
        assert_eq!(parse_hours("22:00-24:00"), Ok((1320, 0)));
        assert_eq!(parse_hours("22:00-06:00"), Ok((1320, 360)));
        for bad in ["8-18", "08:00", "08:60-09:00", "25:00-26:00", "24:00-01:00"] {
            assert!(parse_hours(bad).is_err(), "{bad}");
        }
        assert!(parse_hours("09:00-09:00").unwrap_err().contains("empty"));
    }

    fn policy(windows: &[(&str, &str, &str)], default: Option<&str>) -> Policy {
        Policy::from_config(&ThrottleConfig {
            limit: default.map(str::to_string),
            windows: windows
                .iter()
                .map(|&(days, hours, limit)| WindowConfig {
                    days: Some(days.to_string()),
                    hours: hours.to_string(),
                    limit: limit.to_string(),
                })
                .collect(),
        })
        .unwrap()
    }

    fn at(weekday: u8, hh: u16, mm: u16) -> LocalTime {
        LocalTime {
            weekday,
            minute: hh * 60 + mm,
        }
    }

    #[test]
    fn the_first_window_holding_the_time_sets_the_limit() {
        let p = policy(
            &[
                ("mon-fri", "08:00-18:00", "10MB/s"),
                ("fri", "22:00-06:00", "unlimited"),
                ("mon-sun", "00:00-24:00", "50MB/s"),
            ],
            Some("100MB/s"),
        );
        let limit = |t| p.limit_at(t).0.map(Rate::bytes_per_s);
        assert_eq!(limit(at(0, 8, 0)), Some(10_000_000), "Monday 08:00");
        assert_eq!(limit(at(4, 17, 59)), Some(10_000_000), "Friday 17:59");
        assert_eq!(limit(at(4, 18, 0)), Some(50_000_000), "Friday 18:00");
        assert_eq!(limit(at(4, 22, 0)), None, "Friday 22:00");
        assert_eq!(limit(at(5, 5, 59)), None, "Saturday 05:59, Friday's night");
        assert_eq!(limit(at(5, 6, 0)), Some(50_000_000), "Saturday 06:00");
        assert_eq!(limit(at(3, 23, 0)), Some(50_000_000), "Thursday night");
        assert_eq!(limit(at(4, 2, 0)), Some(50_000_000), "Friday 02:00");
        assert_eq!(p.limit_at(at(0, 9, 0)).1, Some("mon-fri 08:00-18:00"));
        let only_default = policy(&[("sat,sun", "00:00-24:00", "1MB/s")], None);
        assert_eq!(only_default.limit_at(at(0, 9, 0)), (None, None));
        assert_eq!(
            only_default
                .limit_at(at(6, 23, 59))
                .0
                .map(Rate::bytes_per_s),
            Some(1_000_000)
        );
    }

    #[test]
    fn a_bad_window_names_itself() {
        let e = Policy::from_config(&ThrottleConfig {
            limit: None,
            windows: vec![WindowConfig {
                days: None,
                hours: "08:00-18:00".into(),
                limit: "10".into(),
            }],
        })
        .unwrap_err();
        assert!(
            e.starts_with("window mon-sun 08:00-18:00: upload limit \"10\""),
            "{e}"
        );
    }

    #[test]
    fn slots_follow_each_other_at_the_limit_and_restart_when_it_changes() {
        let clock = LinkClock::private().unwrap();
        let ms = |n: u64| 1_000_000_000 + n * 1_000_000;
        let second = 1_000_000_000;
        clock.restart(ms(0));
        // Slots a second long: each after the one before, whoever asks.
        assert_eq!(clock.reserve(second, ms(0)), ms(0));
        assert_eq!(clock.reserve(second, ms(10)), ms(1000));
        assert_eq!(clock.reserve(second / 2, ms(20)), ms(2000));
        assert_eq!(clock.reserve(second, ms(30)), ms(2500));
        // After an idle spell the next upload goes at once, and only it.
        assert_eq!(clock.reserve(second, ms(9000)), ms(9000));
        assert_eq!(clock.reserve(second, ms(9000)), ms(10_000));
        // A restart voids the slots given out and counts from now.
        let generation = clock.generation();
        clock.restart(ms(9100));
        assert_eq!(clock.generation(), generation + 1);
        assert_eq!(clock.reserve(second / 4, ms(9100)), ms(9100));
        assert_eq!(clock.reserve(second / 4, ms(9100)), ms(9350));
    }

    #[test]
    fn processes_mapping_one_clock_file_share_its_slots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("throttle.clock");
        // Two maps of one file, as two shipper processes have.
        let (a, b) = (
            LinkClock::shared(&path).unwrap(),
            LinkClock::shared(&path).unwrap(),
        );
        let second = 1_000_000_000;
        a.restart(second);
        assert_eq!(b.generation(), a.generation());
        assert_eq!(a.reserve(second, second), second);
        assert_eq!(b.reserve(second, second), 2 * second);
        assert_eq!(a.reserve(second, second), 3 * second);
        // One restart per new limit, by whichever process sees it first.
        assert!(a.switch_rate(1_000));
        assert!(!b.switch_rate(1_000));
        assert!(b.switch_rate(2_000));
        // A clock from another boot is zeroed when opened: its times are that boot's.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[b'0'; 32], OFF_BOOT_ID as u64)
            .unwrap();
        let after_reboot = LinkClock::shared(&path).unwrap();
        assert_eq!(after_reboot.reserve(second, 5), 5);
        assert!(
            after_reboot.switch_rate(2_000),
            "the limit is forgotten too"
        );
        // Not a clock: refused with what to do.
        let other = dir.path().join("other");
        std::fs::write(&other, b"not a clock").unwrap();
        let e = LinkClock::shared(&other).unwrap_err();
        assert!(
            e.contains("not an upload throttle clock") && e.contains("stop every shipper"),
            "{e}"
        );
    }

    #[test]
    fn admit_holds_uploads_to_the_limit_and_lets_go_when_stopping() {
        // 1 MB/s: three 100 kB uploads start 0, 100 and 200 ms after the first.
        let throttle = Throttle::new(Policy::constant(rate(1_000_000)));
        let start = Instant::now();
        let waited: Duration = (0..3)
            .map(|_| throttle.admit(100_000, || false).unwrap())
            .sum();
        assert!(start.elapsed() >= Duration::from_millis(200));
        // What it reports having waited: some, and no more than went by (a nap that
        // oversleeps brings the next slot nearer, so no lower bound holds).
        assert!(
            waited > Duration::ZERO && waited <= start.elapsed(),
            "{waited:?}"
        );
        // The next slot is 10 s away; stopping ends the wait.
        assert!(throttle.admit(10_000_000, || false).is_some());
        let waiting = Instant::now();
        assert_eq!(throttle.admit(1, || true), None);
        assert!(waiting.elapsed() < Duration::from_secs(5));
        // A reload to unlimited lets the next upload go at once.
        throttle.set_policy(Policy::unlimited());
        assert!(throttle.admit(10_000_000, || false).is_some());
        assert_eq!(throttle.limit_now(), (None, None));
    }

    #[test]
    fn a_process_joining_a_shared_clock_queues_behind_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("throttle.clock");
        let limit = || Policy::constant(rate(1_000_000));
        let (a, b) = (
            Throttle::shared(limit(), &path),
            Throttle::shared(limit(), &path),
        );
        let start = Instant::now();
        // a's slots: 0, 100 and 200 ms; b's first upload takes the next, at 300 ms,
        // rather than restarting the clock for a limit it already runs at.
        for _ in 0..3 {
            a.admit(100_000, || false).unwrap();
        }
        b.admit(100_000, || false).unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(290),
            "{:?}",
            start.elapsed()
        );
    }
}
