//! The queue thread of a blkfilter device: serves every request of the device's one
//! hardware queue and, with capture, the ring's housekeeping.
//!
//! It uses libublk's callback API: every completion on the queue's io_uring calls
//! [`QueueServer::on_completion`] on this thread — a new request from the ublk driver,
//! the backing operation of a request, the housekeeping timer, or a housekeeping read.
//! Each tag has at most one backing operation in flight ([`TagOp`], found again by the
//! tag in the completion's user_data), so serving a request costs what its backing
//! operation costs and no executor runs. (The async form, a task per tag, served ~8%
//! fewer 4k writes under TCG, as rublk's own async path does: bench/RESULTS.md.)
//!
//! Contract:
//!
//! * **I1, I2.** A request that changes the volume is done on the backing and, when
//!   that succeeded, recorded with the [`Recorder`] *before* its completion goes to
//!   the kernel:
//!
//!   | ublk op | backing I/O | record |
//!   |---|---|---|
//!   | READ | read | – |
//!   | WRITE | write | WRITE + data |
//!   | WRITE with FUA | write with `RWF_DSYNC` | FUA + data |
//!   | FLUSH | fsync | FLUSH |
//!   | DISCARD | fallocate(PUNCH_HOLE) | DISCARD |
//!   | WRITE_ZEROES | fallocate(PUNCH_HOLE), or ZERO_RANGE with NOUNMAP | WRITE_ZEROES |
//!
//! * **Claims.** With a recorder, no two operations on overlapping ranges that change
//!   the backing, or read it for the ring, are in flight together: the kernel may
//!   complete two overlapping backing writes in either order, and records are
//!   numbered in completion order, so without this the replica could end with the
//!   other write's data than the source. A request whose range is claimed waits in
//!   `parked` and starts when the claim goes. Without a recorder nothing is claimed.
//! * **Activity log.** A claimed request makes its range hot in the activity log
//!   before its backing operation (I1 across unclean stops); if that fails the request
//!   fails with EIO and nothing is written. Cooling spares the extents of claimed
//!   ranges: a write in flight is not recorded yet, so its extent's last recorded seq
//!   may be staged already while its data is reaching the backing.
//! * **Housekeeping** (with a recorder) runs on a timer every [`HOUSEKEEPING_TICK`],
//!   one step at a time, between requests: MARK requests, cooling activity-log
//!   extents after an fsync of the backing, digest comparison of blocks in doubt, and
//!   re-recording regions a ring overflow lost ([`Recorder::begin_resync`]). Its reads
//!   take claims like writes, and a resync pass stops when the ring is half full,
//!   leaving the rest in the dirty bitmap for the next tick.

use crate::capture::{Recorder, RESYNC_CHUNK_BYTES};
use changelog::Op;
use io_uring::{opcode, squeue, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::UblkIORes;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

/// How often housekeeping looks for work.
pub const HOUSEKEEPING_TICK: std::time::Duration = std::time::Duration::from_millis(200);

/// user_data tags of the queue's own operations, above every request tag (libublk
/// caps the queue depth far below).
const TIMER_TAG: u16 = u16::MAX;
const HOUSEKEEPING_TAG: u16 = u16::MAX - 1;
/// A backing operation that fails with EAGAIN is submitted again, this many times in
/// all, before the request fails.
const TRIES: u8 = 4;
/// The backing is the queue's fixed file 1 (0 is the ublk char device).
const BACKING: types::Fixed = types::Fixed(1);

/// Serves queue `qid` of `dev` until the device goes away.
pub(crate) fn serve(qid: u16, dev: &UblkDev, backing: File, recorder: Option<Recorder>) {
    // The backing file must outlive every request; it lives as long as this thread.
    let _backing = backing;
    let mut server = match QueueServer::new(dev, recorder) {
        Ok(server) => server,
        Err(e) => {
            log::error!("queue {qid}: housekeeping timer: {e}");
            return;
        }
    };
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&server.bufs))))
    {
        Ok(queue) => queue,
        Err(e) => {
            log::error!("queue {qid}: {e}");
            return;
        }
    };
    server.start_timer(&queue);
    queue.wait_and_handle_io(move |q, tag, io| server.on_completion(q, tag, io));
}

/// A backing operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    Read,
    Write { fua: bool },
    Flush,
    ZeroRange,
    Punch,
}

/// The request a tag is serving.
#[derive(Clone, Copy, Debug)]
struct TagOp {
    backing: Backing,
    offset: u64,
    len: u64,
    /// What is recorded once the backing operation succeeded.
    record: Option<Op>,
    /// Whether `[offset, offset + len)` is in the claims.
    claimed: bool,
    tries: u8,
}

impl TagOp {
    fn changes_data(&self) -> bool {
        matches!(
            self.backing,
            Backing::Write { .. } | Backing::ZeroRange | Backing::Punch
        )
    }

    fn succeeded(&self, res: i32) -> bool {
        match self.backing {
            Backing::Read | Backing::Write { .. } => res >= 0 && res as u64 == self.len,
            Backing::Flush | Backing::ZeroRange | Backing::Punch => res == 0,
        }
    }

    fn sqe(&self, buf: &IoBuf<u8>) -> squeue::Entry {
        let len = self.len as u32;
        let fallocate = |mode| {
            opcode::Fallocate::new(BACKING, self.len)
                .offset(self.offset)
                .mode(mode)
                .build()
        };
        match self.backing {
            Backing::Read => opcode::Read::new(BACKING, buf.as_mut_ptr(), len)
                .offset(self.offset)
                .build(),
            Backing::Write { fua } => opcode::Write::new(BACKING, buf.as_ptr(), len)
                .offset(self.offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            Backing::Flush => opcode::Fsync::new(BACKING).build(),
            // Keeps the blocks allocated, where the file system supports it (tmpfs
            // does not: EOPNOTSUPP, and the hole is punched instead).
            Backing::ZeroRange => fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            // As the kernel's loop driver: reads of a hole return zeroes.
            Backing::Punch => fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
        }
    }
}

/// Where housekeeping is.
#[derive(Debug)]
enum Step {
    /// Waiting for the next tick.
    Idle,
    /// The backing's fsync is in flight; then activity-log extents released up to
    /// `released` cool (see `activity_log` on volatile caches).
    Evict { released: u64 },
    /// Comparing one block of a digest pass; its read is in flight when `reading`,
    /// else it waits for its range to be free.
    Digest {
        offset: u64,
        len: u64,
        reading: bool,
    },
    /// Re-recording `pieces` lost to a ring overflow; piece `next` is being read when
    /// `reading`, else it waits for its range.
    Resync {
        pieces: Vec<(u64, u64)>,
        next: usize,
        reading: bool,
    },
}

struct Housekeeping {
    recorder: Recorder,
    timer: TimerFd,
    /// Where the timer's expiration count is read to; boxed so its address holds.
    ticks: Box<[u8; 8]>,
    /// For digest blocks and resync pieces.
    buf: IoBuf<u8>,
    step: Step,
    tries: u8,
}

pub(crate) struct QueueServer {
    /// One request buffer per tag.
    bufs: Vec<IoBuf<u8>>,
    ops: Vec<Option<TagOp>>,
    /// Ranges with a data-changing operation or housekeeping read in flight.
    claims: Vec<(u64, u64)>,
    /// Tags waiting for their range to be free, oldest first.
    parked: VecDeque<u16>,
    /// With capture: the recorder and its housekeeping.
    capture: Option<Housekeeping>,
}

impl QueueServer {
    fn new(dev: &UblkDev, recorder: Option<Recorder>) -> nix::Result<Self> {
        let capture = match recorder {
            Some(recorder) => {
                let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)?;
                timer.set(
                    Expiration::Interval(TimeSpec::from_duration(HOUSEKEEPING_TICK)),
                    TimerSetTimeFlags::empty(),
                )?;
                let buf_len = RESYNC_CHUNK_BYTES.max(crate::digest_pass::MAX_BLOCK_BYTES.into());
                Some(Housekeeping {
                    recorder,
                    timer,
                    ticks: Box::new([0; 8]),
                    buf: IoBuf::new(buf_len as usize),
                    step: Step::Idle,
                    tries: 0,
                })
            }
            None => None,
        };
        let depth = usize::from(dev.dev_info.queue_depth);
        Ok(QueueServer {
            bufs: dev.alloc_queue_io_bufs(),
            ops: vec![None; depth],
            claims: Vec::new(),
            parked: VecDeque::new(),
            capture,
        })
    }

    fn on_completion(&mut self, q: &UblkQueue, tag: u16, io: &UblkIOCtx) {
        match tag {
            TIMER_TAG => self.on_tick(q, io.result()),
            HOUSEKEEPING_TAG => self.on_housekeeping_io(q, io.result()),
            _ if io.is_tgt_io() => self.on_backing_done(q, tag, io.result()),
            _ => self.on_request(q, tag),
        }
    }

    // ----- requests -----

    fn on_request(&mut self, q: &UblkQueue, tag: u16) {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let io_flags = iod.op_flags >> 8;
        let offset = iod.start_sector << 9;
        let len = u64::from(iod.nr_sectors) << 9;
        let (backing, record) = match op {
            libublk::sys::UBLK_IO_OP_READ => (Backing::Read, None),
            libublk::sys::UBLK_IO_OP_WRITE => {
                let fua = io_flags & libublk::sys::UBLK_IO_F_FUA != 0;
                let record = if fua { Op::Fua } else { Op::Write };
                (Backing::Write { fua }, Some(record))
            }
            libublk::sys::UBLK_IO_OP_FLUSH => (Backing::Flush, Some(Op::Flush)),
            libublk::sys::UBLK_IO_OP_DISCARD => (Backing::Punch, Some(Op::Discard)),
            libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
                // NOUNMAP: the blocks must stay allocated.
                let backing = if io_flags & libublk::sys::UBLK_IO_F_NOUNMAP != 0 {
                    Backing::ZeroRange
                } else {
                    Backing::Punch
                };
                (backing, Some(Op::WriteZeroes))
            }
            _ => return self.complete(q, tag, -libc::EINVAL),
        };
        let (offset, len) = if backing == Backing::Flush {
            (0, 0)
        } else {
            (offset, len)
        };
        self.ops[usize::from(tag)] = Some(TagOp {
            backing,
            offset,
            len,
            record,
            claimed: false,
            tries: 0,
        });
        self.start(q, tag);
    }

    /// Claims the tag's range if it needs one (or parks it), then submits.
    fn start(&mut self, q: &UblkQueue, tag: u16) {
        let mut op = self.ops[usize::from(tag)].expect("a request");
        if op.changes_data() && self.capture.is_some() {
            let range = (op.offset, op.offset + op.len);
            if self.overlaps(range) {
                self.parked.push_back(tag);
                return;
            }
            self.claims.push(range);
            op.claimed = true;
            self.ops[usize::from(tag)] = Some(op);
            let capture = self.capture.as_mut().expect("capture");
            if let Err(e) = capture.recorder.activity_log_ensure(op.offset, op.len) {
                log::error!("{e}; failing the write");
                return self.finish(q, tag, -libc::EIO);
            }
        }
        self.submit(q, tag);
    }

    fn submit(&mut self, q: &UblkQueue, tag: u16) {
        let op = self.ops[usize::from(tag)].expect("a request");
        let sqe = op
            .sqe(&self.bufs[usize::from(tag)])
            .user_data(UblkIOCtx::build_user_data(tag, 0, 0, true));
        if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
            log::error!("tag {tag}: submitting the backing operation: {e}");
            self.finish(q, tag, -libc::EIO);
        }
    }

    fn on_backing_done(&mut self, q: &UblkQueue, tag: u16, res: i32) {
        let Some(mut op) = self.ops[usize::from(tag)] else {
            log::error!("tag {tag}: a backing completion for no request");
            return;
        };
        if res == -libc::EAGAIN && op.tries + 1 < TRIES {
            op.tries += 1;
        } else if res == -libc::EOPNOTSUPP && op.backing == Backing::ZeroRange {
            op.backing = Backing::Punch;
            op.tries = 0;
        } else {
            if let (Some(record), Some(capture)) = (op.record, self.capture.as_mut()) {
                if op.succeeded(res) {
                    let data: &[u8] = match op.backing {
                        Backing::Write { .. } => {
                            &self.bufs[usize::from(tag)].as_slice()[..op.len as usize]
                        }
                        _ => &[],
                    };
                    capture.recorder.record(record, op.offset, op.len, data, 0);
                } else if op.changes_data() {
                    // Not recorded; it may still have changed part of its range.
                    let is_write = matches!(op.backing, Backing::Write { .. });
                    if capture
                        .recorder
                        .backing_failed(op.offset, op.len, is_write, -res)
                    {
                        log::warn!(
                            "backing {:?} of {}+{} failed ({res}); the range is resynced",
                            op.backing,
                            op.offset,
                            op.len
                        );
                    }
                }
            }
            return self.finish(q, tag, res);
        }
        self.ops[usize::from(tag)] = Some(op);
        self.submit(q, tag);
    }

    /// Ends the tag's request with `res` (bytes or -errno): releases its claim, which
    /// may start parked requests, and completes it to the kernel.
    fn finish(&mut self, q: &UblkQueue, tag: u16, res: i32) {
        if let Some(op) = self.ops[usize::from(tag)].take() {
            if op.claimed {
                self.unclaim((op.offset, op.offset + op.len), q);
            }
        }
        self.complete(q, tag, res);
    }

    fn complete(&self, q: &UblkQueue, tag: u16, res: i32) {
        let buf = BufDesc::Slice(self.bufs[usize::from(tag)].as_slice());
        if let Err(e) = q.complete_io_cmd_unified(tag, buf, Ok(UblkIORes::Result(res))) {
            log::error!("tag {tag}: completing the request: {e}");
        }
    }

    // ----- claims -----

    fn overlaps(&self, (start, end): (u64, u64)) -> bool {
        self.claims.iter().any(|&(s, e)| s < end && start < e)
    }

    /// Releases a claim, then starts what waited for it: parked requests in arrival
    /// order, and housekeeping's read.
    fn unclaim(&mut self, range: (u64, u64), q: &UblkQueue) {
        if let Some(i) = self.claims.iter().position(|&r| r == range) {
            self.claims.swap_remove(i);
        }
        // Rescanned from the front after each start: a start can end its request at
        // once (activity log failure), which comes back here.
        while let Some(i) = self.parked.iter().position(|&tag| {
            let op = self.ops[usize::from(tag)].expect("a parked request");
            !self.overlaps((op.offset, op.offset + op.len))
        }) {
            let tag = self.parked.remove(i).expect("found above");
            self.start(q, tag);
        }
        self.housekeeping_read(q);
    }

    // ----- housekeeping -----

    fn start_timer(&mut self, q: &UblkQueue) {
        let Some(capture) = &mut self.capture else {
            return;
        };
        let sqe = opcode::Read::new(
            types::Fd(capture.timer.as_fd().as_raw_fd()),
            capture.ticks.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(UblkIOCtx::build_user_data(TIMER_TAG, 0, 0, true));
        if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
            log::error!("housekeeping timer: {e}; no more housekeeping on this queue");
        }
    }

    fn on_tick(&mut self, q: &UblkQueue, res: i32) {
        if q.is_stopping() {
            return;
        }
        if res < 0 {
            log::warn!("housekeeping timer read failed ({res})");
        }
        self.start_timer(q);
        let Some(capture) = &mut self.capture else {
            return;
        };
        if !matches!(capture.step, Step::Idle) {
            return; // the last tick's work goes on
        }
        let recorder = &mut capture.recorder;
        recorder.serve_mark_requests();
        recorder.serve_group_cuts();
        if let Some(released) = recorder.activity_log_evictable(&self.claims) {
            // The backing first: see activity_log on volatile caches.
            capture.step = Step::Evict { released };
            capture.tries = 0;
            return self.submit_housekeeping(q);
        }
        recorder.digest_poll();
        self.next_digest_block(q);
    }

    fn next_digest_block(&mut self, q: &UblkQueue) {
        let capture = self.capture.as_mut().expect("capture");
        if let Some((offset, len)) = capture.recorder.digest_next() {
            capture.step = Step::Digest {
                offset,
                len,
                reading: false,
            };
            return self.housekeeping_read(q);
        }
        if !capture.recorder.resync_due() {
            capture.step = Step::Idle;
            return;
        }
        let pieces = capture.recorder.begin_resync();
        if !pieces.is_empty() {
            log::info!(
                "resync pass: re-recording {} piece(s) lost to a ring overflow",
                pieces.len()
            );
        }
        capture.step = Step::Resync {
            pieces,
            next: 0,
            reading: false,
        };
        self.next_resync_piece(q);
    }

    fn next_resync_piece(&mut self, q: &UblkQueue) {
        let capture = self.capture.as_mut().expect("capture");
        let Step::Resync { pieces, next, .. } = &capture.step else {
            unreachable!("resync step");
        };
        if *next < pieces.len() && capture.recorder.has_room_for_resync() {
            return self.housekeeping_read(q);
        }
        // Done, or the ring is half full.
        self.end_resync();
    }

    /// Ends a resync pass: the pieces not re-recorded go back to the bitmap for the
    /// next pass.
    fn end_resync(&mut self) {
        let capture = self.capture.as_mut().expect("capture");
        if let Step::Resync { pieces, next, .. } = &capture.step {
            for &(offset, len) in &pieces[*next..] {
                capture.recorder.mark_dirty(offset, len);
            }
        }
        capture.recorder.end_resync();
        capture.step = Step::Idle;
    }

    /// The range housekeeping reads next, when it is waiting to read.
    fn housekeeping_range(step: &Step) -> Option<(u64, u64)> {
        match step {
            Step::Digest {
                offset,
                len,
                reading: false,
            } => Some((*offset, *len)),
            Step::Resync {
                pieces,
                next,
                reading: false,
            } => pieces.get(*next).copied(),
            _ => None,
        }
    }

    /// Claims and reads the range housekeeping waits for, if it is free.
    fn housekeeping_read(&mut self, q: &UblkQueue) {
        let Some(capture) = &self.capture else {
            return;
        };
        let Some((offset, len)) = Self::housekeeping_range(&capture.step) else {
            return;
        };
        if self.overlaps((offset, offset + len)) {
            return; // started again when the claim goes
        }
        self.claims.push((offset, offset + len));
        let capture = self.capture.as_mut().expect("capture");
        match &mut capture.step {
            Step::Digest { reading, .. } | Step::Resync { reading, .. } => *reading = true,
            _ => unreachable!("a read step"),
        }
        capture.tries = 0;
        self.submit_housekeeping(q);
    }

    fn submit_housekeeping(&mut self, q: &UblkQueue) {
        let capture = self.capture.as_mut().expect("capture");
        let read = |offset: u64, len: u64| {
            opcode::Read::new(BACKING, capture.buf.as_mut_ptr(), len as u32)
                .offset(offset)
                .build()
        };
        let sqe = match &capture.step {
            Step::Evict { .. } => opcode::Fsync::new(BACKING).build(),
            Step::Digest { offset, len, .. } => read(*offset, *len),
            Step::Resync { pieces, next, .. } => read(pieces[*next].0, pieces[*next].1),
            Step::Idle => unreachable!("no housekeeping I/O when idle"),
        };
        let sqe = sqe.user_data(UblkIOCtx::build_user_data(HOUSEKEEPING_TAG, 0, 0, true));
        if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
            log::error!("housekeeping: submitting: {e}");
            self.on_housekeeping_io(q, -libc::EIO);
        }
    }

    fn on_housekeeping_io(&mut self, q: &UblkQueue, res: i32) {
        let capture = self.capture.as_mut().expect("capture");
        if res == -libc::EAGAIN && capture.tries + 1 < TRIES {
            capture.tries += 1;
            return self.submit_housekeeping(q);
        }
        match std::mem::replace(&mut capture.step, Step::Idle) {
            Step::Idle => log::error!("housekeeping: a completion with nothing in flight"),
            Step::Evict { released } => {
                if res == 0 {
                    // Claimed ranges include every write made hot and not yet
                    // recorded, some begun after the fsync: their extents stay hot.
                    capture.recorder.activity_log_evict(released, &self.claims);
                }
                capture.recorder.digest_poll();
                self.next_digest_block(q);
            }
            Step::Digest { offset, len, .. } => {
                if res >= 0 && res as u64 == len {
                    let data = &capture.buf.as_slice()[..len as usize];
                    capture.recorder.digest_compare(offset, data);
                } else {
                    log::warn!(
                        "digest resync read at {offset}+{len} failed ({res}); left to the overflow resync"
                    );
                    capture.recorder.digest_skip(offset, len);
                }
                self.unclaim((offset, offset + len), q);
                self.next_digest_block(q);
            }
            Step::Resync { pieces, next, .. } => {
                let (offset, len) = pieces[next];
                let read = res >= 0 && res as u64 == len;
                if read {
                    let data = &capture.buf.as_slice()[..len as usize];
                    capture.recorder.record(Op::Write, offset, len, data, 0);
                } else {
                    log::warn!(
                        "resync read at {offset}+{len} failed ({res}); retrying on the next pass"
                    );
                }
                // Housekeeping is idle meanwhile, so the release starts only requests.
                self.unclaim((offset, offset + len), q);
                let capture = self.capture.as_mut().expect("capture");
                // A failed piece goes back to the bitmap with the rest.
                capture.step = Step::Resync {
                    pieces,
                    next: next + usize::from(read),
                    reading: false,
                };
                if read {
                    self.next_resync_piece(q);
                } else {
                    self.end_resync();
                }
            }
        }
    }
}
