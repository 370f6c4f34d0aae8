//! Serving a recovery-side view (a replica at a recovery point, with a scratch overlay)
//! as a ublk block device, `/dev/ublkbN`.
//!
//! One queue; each tag is a task on the queue thread's local executor, and every
//! request is served synchronously against the [`Backend`] (which is `&mut`, so
//! requests are handled one at a time, in the order the tasks run). The device carries
//! the target name [`VIEW_TARGET`] and a [`ViewInfo`] in its json, so `list` and
//! `failover --cleanup` can tell views from protected volumes. No user recovery: when
//! the server dies the device goes away with it (a test view is disposable).

use crate::error::{Result, TargetError};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{UblkError, UblkFlags};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// The ublk target name of view devices.
pub const VIEW_TARGET: &str = "ublk-dr-view";

/// What a view device shows, saved in its json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInfo {
    pub replica: PathBuf,
    pub point: u64,
    /// Where writes to the view go; deleted when the view ends.
    pub scratch: PathBuf,
}

/// A block device's contents, served one request at a time.
pub trait Backend {
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    /// DISCARD and WRITE_ZEROES: the range reads back as zeroes.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

impl Backend for crate::PointView {
    fn size(&self) -> u64 {
        crate::PointView::size(self)
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::PointView::read_at(self, buf, offset).map_err(io::Error::other)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        crate::PointView::write_at(self, data, offset).map_err(io::Error::other)
    }
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len).map_err(io::Error::other)
    }
    fn flush(&mut self) -> io::Result<()> {
        crate::PointView::flush(self).map_err(io::Error::other)
    }
}

fn ublk_err(e: UblkError) -> TargetError {
    TargetError::Device(e.to_string())
}

/// Creates `/dev/ublkb<id>` (`id` -1: the kernel picks) serving `backend` until the
/// device is deleted; `on_ready` gets the id once it is live.
pub fn serve<B: Backend + Send + 'static>(
    backend: B,
    id: i32,
    info: &ViewInfo,
    on_ready: impl FnOnce(u32) + Send + Sync + 'static,
) -> Result<()> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(TargetError::Device(
            "/dev/ublk-control is missing: this kernel has no ublk (modprobe ublk_drv, or run inside scripts/vm.sh)".into(),
        ));
    }
    // libublk deletes device `id` when an ADD for it fails: check first.
    if blkfilter::server::open_device(id).is_some() {
        return Err(TargetError::Device(format!(
            "ublk device id {id} is already in use; pick another --id"
        )));
    }
    let size = backend.size();
    let ctrl = UblkCtrlBuilder::default()
        .name(VIEW_TARGET)
        .id(id)
        .nr_queues(1)
        .depth(64)
        .io_buf_bytes(1 << 20)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(ublk_err)?;
    let json = serde_json::json!({ VIEW_TARGET: info });
    let tgt_init = move |dev: &mut UblkDev| {
        let max_io = dev.dev_info.max_io_buf_bytes;
        dev.tgt.dev_size = size;
        dev.tgt.params = blkfilter::server::device_params(size, max_io, false);
        dev.set_target_json(json.clone());
        Ok(())
    };
    let backend = Arc::new(Mutex::new(Some(backend)));
    let queue_fn = move |qid: u16, dev: &UblkDev| {
        let backend = backend
            .lock()
            .expect("backend lock")
            .take()
            .expect("one queue");
        serve_queue(qid, dev, backend);
    };
    let result = ctrl.run_target(tgt_init, queue_fn, move |ctrl: &UblkCtrl| {
        on_ready(ctrl.dev_info().dev_id)
    });
    if let Err(e) = result {
        let _ = ctrl.del_dev();
        return Err(ublk_err(e));
    }
    Ok(())
}

fn serve_queue<B: Backend>(qid: u16, dev: &UblkDev, backend: B) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            log::error!("queue {qid}: {e}");
            return;
        }
    };
    let backend = Rc::new(RefCell::new(backend));
    let executor = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = queue
        .tags()
        .map(|tag| {
            let (queue, backend) = (queue.clone(), backend.clone());
            executor.spawn(async move {
                match serve_tag(&queue, &backend, tag).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => log::error!("tag {tag}: {e}"),
                }
            })
        })
        .collect();
    let exe = executor.clone();
    smol::block_on(executor.run(async move {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&queue, Some(20), run_ops, done).await {
            log::error!("queue {qid}: {e}");
        }
    }));
}

async fn serve_tag<B: Backend>(
    queue: &UblkQueue<'_>,
    backend: &RefCell<B>,
    tag: u16,
) -> std::result::Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(queue.dev.dev_info.max_io_buf_bytes as usize);
    queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle(queue, &mut *backend.borrow_mut(), tag, &buf);
        queue
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Serves one request; the result for the kernel (bytes or -errno).
fn handle<B: Backend>(queue: &UblkQueue<'_>, backend: &mut B, tag: u16, buf: &IoBuf<u8>) -> i32 {
    let iod = queue.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let len = (u64::from(iod.nr_sectors) << 9) as usize;
    // A FLUSH carries no range (its sector field is not meaningful).
    let out_of_range = offset.saturating_add(len as u64) > backend.size() || len > buf.len();
    if op != libublk::sys::UBLK_IO_OP_FLUSH && out_of_range {
        log::error!("request op {op} at {offset}+{len} is outside the device");
        return -libc::EINVAL;
    }
    let result = match op {
        libublk::sys::UBLK_IO_OP_READ => {
            // SAFETY: the buffer is this tag's, `len` bytes fit in it (checked above),
            // and the kernel does not touch it until the request is committed.
            let data = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), len) };
            backend.read_at(data, offset).map(|()| len as i32)
        }
        libublk::sys::UBLK_IO_OP_WRITE => backend
            .write_at(&buf.as_slice()[..len], offset)
            .map(|()| len as i32),
        libublk::sys::UBLK_IO_OP_FLUSH => backend.flush().map(|()| 0),
        libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            backend.zero(offset, len as u64).map(|()| 0)
        }
        _ => return -libc::EINVAL,
    };
    result.unwrap_or_else(|e| {
        log::error!("request op {op} at {offset}+{len}: {e}");
        -e.raw_os_error().unwrap_or(libc::EIO)
    })
}

/// The view a device serves, if it is a view device.
pub fn view_info(id: i32) -> Option<ViewInfo> {
    let ctrl = blkfilter::server::open_device(id)?;
    let data = ctrl.get_target_data_from_json()?;
    serde_json::from_value(data.get(VIEW_TARGET)?.clone()).ok()
}

/// Every view device present, with what it shows.
pub fn views() -> Result<Vec<(u32, ViewInfo)>> {
    blkfilter::server::check_ublk().map_err(|e| TargetError::Device(e.to_string()))?;
    let found = Rc::new(RefCell::new(Vec::new()));
    let sink = found.clone();
    UblkCtrl::for_each_dev_id(move |id| {
        if let Some(info) = view_info(id as i32) {
            sink.borrow_mut().push((id, info));
        }
    });
    let views = found.borrow().clone();
    Ok(views)
}

/// Deletes view device `id`; its server then exits and drops the scratch overlay.
/// Refuses devices that are not views (a protected volume must not go this way).
pub fn delete(id: i32) -> Result<ViewInfo> {
    let ctrl = blkfilter::server::open_device(id).ok_or_else(|| {
        TargetError::Device(format!(
            "ublk device {id} does not exist (already cleaned up?)"
        ))
    })?;
    let info = view_info(id).ok_or_else(|| {
        TargetError::Device(format!(
            "ublk device {id} is not a test-failover view; not touching it"
        ))
    })?;
    ctrl.del_dev().map_err(ublk_err)?;
    Ok(info)
}
