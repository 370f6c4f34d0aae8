//! The ublk server: `/dev/ublkbN` in front of a backing file or block device.
//!
//! One hardware queue, served by one thread ([`crate::queue`]), so the ring has exactly
//! one producer. Requests that change the volume are recorded with the shared
//! [`Recorder`] *after* the backing I/O completed and *before* the request is completed
//! to the kernel (I1, I2); overlapping writes are never in flight together.
//!
//! The device is created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! when the server dies the device stays (QUIESCED) and [`recover`] takes it back;
//! requests the dead server held are re-issued to the new one. A re-issued write is
//! simply done and recorded again, which is harmless: records are absolute.

use crate::activity_log::{ActivityLog, DEFAULT_EXTENT_BYTES};
use crate::capture::{device_size, Recorder};
use crate::ring::{GroupClock, Producer, RingGeometry};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{UblkError, UblkFlags};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// The ublk target name of blkfilter devices (`blkfilter list` shows only these).
pub const TARGET_NAME: &str = "blkfilter";

/// Errors of attaching, recovering and detaching devices.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("backing {path}: {source}")]
    Backing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("backing {path} is {size} bytes; a volume must be a non-zero multiple of 512 bytes")]
    BackingSize { path: PathBuf, size: u64 },
    #[error("{source}")]
    Ring {
        path: PathBuf,
        #[source]
        source: crate::ring::RingError,
    },
    #[error("cannot create the ring's directory {path}: {source}")]
    RingDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("/dev/ublk-control is missing: this kernel has no ublk (try `modprobe ublk_drv`; on kernels without it, run inside the VM: scripts/vm.sh run -- ...)")]
    NoUblk,
    #[error("ublk device id {0} is already in use (see `blkfilter list`; pick another --id or leave it out)")]
    IdInUse(i32),
    #[error("ublk device {0} does not exist (see `blkfilter list`)")]
    NoDevice(i32),
    #[error("ublk device {id} is not a blkfilter device (target {target:?})")]
    NotOurs { id: i32, target: String },
    #[error("ublk device {id} cannot be recovered: {why}")]
    NotRecoverable { id: i32, why: String },
    #[error("ublk: {0}")]
    Ublk(#[from] UblkError),
    #[error(transparent)]
    ActivityLog(crate::activity_log::ActivityLogError),
}

/// What `attach` needs.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub backing: PathBuf,
    /// The capture ring; `None` serves the device without capture (to measure its cost).
    pub ring: Option<PathBuf>,
    /// Ring data capacity when the ring is created.
    pub ring_bytes: u64,
    /// Device id, or -1 to let the kernel choose.
    pub id: i32,
    pub queue_depth: u16,
    /// Largest request in bytes.
    pub io_buf_bytes: u32,
    /// Open the backing with O_DIRECT (falls back to buffered where unsupported).
    pub direct: bool,
    /// The activity log (persistent hot extents, for unclean stops); only with a ring.
    pub activity_log: Option<PathBuf>,
    /// Resync regions in doubt by digest comparison, waiting this long for the
    /// replica's digests (see [`Recorder::set_resync_compare`]).
    pub resync_compare_wait: Option<std::time::Duration>,
    /// The consistency group's clock (created if missing), when the volume is in one.
    pub group_clock: Option<PathBuf>,
}

/// Saved in the device's json so `recover` and `list` know what the device serves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetInfo {
    pub backing: PathBuf,
    pub ring: Option<PathBuf>,
    /// Ring data capacity, so a recovering server reopens the ring as it was made.
    pub ring_bytes: u64,
    pub direct: bool,
    #[serde(default)]
    pub activity_log: Option<PathBuf>,
    #[serde(default)]
    pub resync_compare_wait_ms: Option<u64>,
    #[serde(default)]
    pub group_clock: Option<PathBuf>,
}

/// One device as `list` shows it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub id: u32,
    pub state: &'static str,
    pub size_bytes: u64,
    pub pid: i32,
    pub target: Option<TargetInfo>,
}

/// The control of existing ublk device `id`; `None` when there is none. sysfs is asked
/// first: libublk, asked to open an id that does not exist, prints "device reload json
/// failed" on stderr, which would end up in front of users on every attach.
pub fn open_device(id: i32) -> Option<UblkCtrl> {
    if id < 0 || !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return None;
    }
    UblkCtrl::new_simple(id).ok()
}

/// Whether this kernel has ublk (`/dev/ublk-control`), or an error that says what to do.
pub fn check_ublk() -> Result<(), ServerError> {
    if Path::new("/dev/ublk-control").exists() {
        Ok(())
    } else {
        Err(ServerError::NoUblk)
    }
}

fn open_backing(path: &Path, direct: bool) -> Result<(File, bool), ServerError> {
    let err = |source| ServerError::Backing {
        path: path.into(),
        source,
    };
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if direct {
        match options.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: O_DIRECT not supported here, using buffered I/O",
                    path.display()
                );
            }
            Err(e) => return Err(err(e)),
        }
    }
    Ok((options.open(path).map_err(err)?, false))
}

/// Everything the queue thread needs, handed over once.
struct QueueSetup {
    backing: File,
    recorder: Option<Recorder>,
}

/// Creates (or, with `recover`, takes back) the device and serves it until it is
/// deleted. `on_ready` runs once the device is live, with its id.
pub fn serve(
    opts: &AttachOptions,
    recover_id: Option<i32>,
    on_ready: impl FnOnce(u32) + Send + Sync + 'static,
) -> Result<(), ServerError> {
    let (backing, direct) = open_backing(&opts.backing, opts.direct)?;
    check_ublk()?;
    let size = device_size(&backing).map_err(|source| ServerError::Backing {
        path: opts.backing.clone(),
        source,
    })?;
    if size == 0 || size % 512 != 0 {
        return Err(ServerError::BackingSize {
            path: opts.backing.clone(),
            size,
        });
    }
    let recorder = match &opts.ring {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| ServerError::RingDir {
                    path: dir.into(),
                    source,
                })?;
            }
            let mut producer = Producer::create(path, &RingGeometry::new(opts.ring_bytes, size))
                .map_err(|source| ServerError::Ring {
                    path: path.clone(),
                    source,
                })?;
            match &opts.group_clock {
                Some(clock_path) => {
                    let clock = GroupClock::open_or_create(clock_path).map_err(|source| {
                        ServerError::Ring {
                            path: clock_path.clone(),
                            source,
                        }
                    })?;
                    producer.join_group(clock);
                }
                None => producer.leave_group(),
            }
            let mut recorder = match &opts.activity_log {
                Some(al) => {
                    let (log, recovered) = ActivityLog::open(al, size, DEFAULT_EXTENT_BYTES)
                        .map_err(ServerError::ActivityLog)?;
                    Recorder::with_activity_log(producer, log, &recovered)
                        .map_err(ServerError::ActivityLog)?
                }
                None => Recorder::new(producer),
            };
            recorder.set_resync_compare(opts.resync_compare_wait);
            Some(recorder)
        }
        None => None,
    };
    let info = TargetInfo {
        backing: opts.backing.clone(),
        ring: opts.ring.clone(),
        ring_bytes: opts.ring_bytes,
        direct,
        activity_log: opts.activity_log.clone(),
        resync_compare_wait_ms: opts.resync_compare_wait.map(|w| w.as_millis() as u64),
        group_clock: opts.group_clock.clone(),
    };

    let recovery =
        (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    let (id, dev_flags) = match recover_id {
        Some(id) => (id, UblkFlags::UBLK_DEV_F_RECOVER_DEV),
        None => (opts.id, UblkFlags::UBLK_DEV_F_ADD_DEV),
    };
    // The queue thread stays on one CPU, as rublk's does by default: its io_uring and
    // the ublk driver's task work then run where the queue's data is cached. libublk
    // does not keep the flag across recovery, so it is set for both.
    let dev_flags = dev_flags | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY;
    // Checked up front: libublk deletes device `id` when an ADD for it fails, which
    // would take down the device that is using the id.
    if recover_id.is_none() && open_device(id).is_some() {
        return Err(ServerError::IdInUse(id));
    }
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id)
        .nr_queues(1)
        .depth(opts.queue_depth)
        .io_buf_bytes(opts.io_buf_bytes)
        .ctrl_flags(recovery)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| match e {
            UblkError::UringIOError(code) | UblkError::OtherError(code)
                if code == -libc::EEXIST =>
            {
                ServerError::IdInUse(id)
            }
            e => ServerError::Ublk(e),
        })?;

    let backing_fd = backing.as_raw_fd();
    let setup = Arc::new(Mutex::new(Some(QueueSetup { backing, recorder })));
    let tgt_init = |dev: &mut UblkDev| init_target(dev, backing_fd, size, &info);
    let queue_fn = move |qid: u16, dev: &UblkDev| {
        let setup = setup.lock().expect("setup lock").take().expect("one queue");
        crate::queue::serve(qid, dev, setup.backing, setup.recorder);
    };
    let result = ctrl.run_target(tgt_init, queue_fn, move |ctrl: &UblkCtrl| {
        on_ready(ctrl.dev_info().dev_id)
    });
    if let Err(e) = result {
        if recover_id.is_none() {
            // Leave no half-made device behind.
            let _ = ctrl.del_dev();
        }
        return Err(e.into());
    }
    Ok(())
}

fn init_target(
    dev: &mut UblkDev,
    backing_fd: i32,
    size: u64,
    info: &TargetInfo,
) -> Result<(), UblkError> {
    let max_io = dev.dev_info.max_io_buf_bytes;
    let tgt = &mut dev.tgt;
    tgt.fds[tgt.nr_fds as usize] = backing_fd;
    tgt.nr_fds += 1;
    tgt.dev_size = size;
    // A volatile cache with FUA: the kernel sends FLUSH and FUA, which capture records,
    // instead of hiding them.
    tgt.params = device_params(size, max_io, true);
    dev.set_target_json(serde_json::json!({ TARGET_NAME: info }));
    Ok(())
}

/// The block-device parameters of a ublk device of `size` bytes: 512-byte logical and
/// 4 KiB physical blocks, requests up to `max_io` bytes, a volatile write cache (so
/// FLUSH reaches the server), FUA when `fua`, and DISCARD / WRITE_ZEROES up to 1 GiB.
/// Shared by blkfilter's devices and the recovery side's view devices.
pub fn device_params(size: u64, max_io: u32, fua: bool) -> libublk::sys::ublk_params {
    let fua = if fua { libublk::sys::UBLK_ATTR_FUA } else { 0 };
    libublk::sys::ublk_params {
        types: libublk::sys::UBLK_PARAM_TYPE_BASIC | libublk::sys::UBLK_PARAM_TYPE_DISCARD,
        basic: libublk::sys::ublk_param_basic {
            attrs: libublk::sys::UBLK_ATTR_VOLATILE_CACHE | fua,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: max_io >> 9,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        discard: libublk::sys::ublk_param_discard {
            discard_granularity: 4096,
            max_discard_sectors: (1 << 30) >> 9,
            max_write_zeroes_sectors: (1 << 30) >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Deletes a blkfilter device (the server exits when its queue goes down).
pub fn detach(id: i32) -> Result<(), ServerError> {
    check_ublk()?;
    let ctrl = open_device(id).ok_or(ServerError::NoDevice(id))?;
    let target = ctrl.get_target_type_from_json().unwrap_or_default();
    if !target.is_empty() && target != TARGET_NAME {
        return Err(ServerError::NotOurs { id, target });
    }
    ctrl.del_dev()?;
    Ok(())
}

/// Reads what a device serves from its json (written by the live or dead server).
pub fn target_info(ctrl: &UblkCtrl) -> Option<TargetInfo> {
    let data = ctrl.get_target_data_from_json()?;
    serde_json::from_value(data.get(TARGET_NAME)?.clone()).ok()
}

/// Whether device `id` exists, is QUIESCED (its server died) and serves `backing`.
pub fn quiesced_with_backing(id: i32, backing: &Path) -> bool {
    if id < 0 || check_ublk().is_err() {
        return false;
    }
    let Some(ctrl) = open_device(id) else {
        return false;
    };
    let same = |a: &Path, b: &Path| {
        a.canonicalize()
            .ok()
            .zip(b.canonicalize().ok())
            .is_some_and(|(a, b)| a == b)
    };
    ctrl.dev_info().state == libublk::sys::UBLK_S_DEV_QUIESCED as u16
        && target_info(&ctrl).is_some_and(|t| same(&t.backing, backing))
}

/// Checks that device `id` is a quiesced blkfilter device and returns how to serve it.
pub fn recovery_plan(id: i32) -> Result<AttachOptions, ServerError> {
    check_ublk()?;
    let ctrl = open_device(id).ok_or(ServerError::NoDevice(id))?;
    let info = ctrl.dev_info();
    if info.flags & libublk::sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        return Err(ServerError::NotRecoverable {
            id,
            why: "it was created without user recovery".into(),
        });
    }
    if info.state != libublk::sys::UBLK_S_DEV_QUIESCED as u16 {
        let why = format!(
            "it is {} (only a device whose server died, QUIESCED, can be recovered)",
            state_name(info.state)
        );
        return Err(ServerError::NotRecoverable { id, why });
    }
    let target = target_info(&ctrl).ok_or_else(|| ServerError::NotRecoverable {
        id,
        why: "its target description is missing".into(),
    })?;
    ctrl.start_user_recover()?;
    Ok(AttachOptions {
        backing: target.backing,
        ring: target.ring,
        ring_bytes: target.ring_bytes,
        id,
        queue_depth: info.queue_depth,
        io_buf_bytes: info.max_io_buf_bytes,
        direct: target.direct,
        activity_log: target.activity_log,
        resync_compare_wait: target
            .resync_compare_wait_ms
            .map(std::time::Duration::from_millis),
        group_clock: target.group_clock,
    })
}

pub fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        libublk::sys::UBLK_S_DEV_DEAD => "DEAD",
        libublk::sys::UBLK_S_DEV_LIVE => "LIVE",
        libublk::sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
        _ => "UNKNOWN",
    }
}

/// The blkfilter devices present.
pub fn list() -> Result<Vec<DeviceInfo>, ServerError> {
    check_ublk()?;
    let found = Rc::new(RefCell::new(Vec::new()));
    let sink = found.clone();
    UblkCtrl::for_each_dev_id(move |dev_id| {
        let Some(ctrl) = open_device(dev_id as i32) else {
            return;
        };
        let info = ctrl.dev_info();
        let mut params = libublk::sys::ublk_params::default();
        let size = ctrl
            .get_params(&mut params)
            .map(|_| params.basic.dev_sectors << 9)
            .unwrap_or(0);
        let target = target_info(&ctrl);
        if target.is_some() || ctrl.get_name() == TARGET_NAME {
            sink.borrow_mut().push(DeviceInfo {
                id: dev_id,
                state: state_name(info.state),
                size_bytes: size,
                pid: info.ublksrv_pid,
                target,
            });
        }
    });
    let devices = found.borrow().clone();
    Ok(devices)
}
