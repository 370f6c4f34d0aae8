//! Operator MARKs through the ring header: `shipper mark` asks, the producer records.
//!
//! The ring has one producer (blkfilter), so another process cannot push a record
//! itself. It bumps `mark_requested` instead; the producer, on its next tick, records
//! one MARK for all requests seen, stores its seq in `mark_seq`, then sets `mark_done`
//! to the request count it served (Release). A requester waits until `mark_done`
//! reaches its own request number and reads the seq. Requests made while a filesystem
//! is frozen (FIFREEZE) get a MARK after every write acknowledged before the freeze.

use super::layout::{OFF_MARK_APP, OFF_MARK_DONE, OFF_MARK_REQUESTED, OFF_MARK_SEQ};
use super::shm::Shm;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

/// A pending MARK request as the producer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRequest {
    /// The request counter to acknowledge once recorded.
    pub upto: u64,
    pub app_consistent: bool,
}

/// Requester side: asks for a MARK; returns the request number to wait for.
pub(super) fn request(shm: &Shm, app_consistent: bool) -> u64 {
    if app_consistent {
        shm.header_u64(OFF_MARK_APP).store(1, Relaxed);
    }
    shm.header_u64(OFF_MARK_REQUESTED).fetch_add(1, AcqRel) + 1
}

/// Requester side: the seq of the MARK that served request `number`, once recorded.
pub(super) fn recorded(shm: &Shm, number: u64) -> Option<u64> {
    (shm.header_u64(OFF_MARK_DONE).load(Acquire) >= number)
        .then(|| shm.header_u64(OFF_MARK_SEQ).load(Relaxed))
}

/// Producer side: the requests not yet served.
pub(super) fn pending(shm: &Shm) -> Option<MarkRequest> {
    let upto = shm.header_u64(OFF_MARK_REQUESTED).load(Acquire);
    (upto > shm.header_u64(OFF_MARK_DONE).load(Relaxed)).then(|| MarkRequest {
        upto,
        app_consistent: shm.header_u64(OFF_MARK_APP).load(Relaxed) != 0,
    })
}

/// Producer side: requests up to `req.upto` are served by the MARK with `seq`.
pub(super) fn served(shm: &Shm, req: MarkRequest, seq: u64) {
    shm.header_u64(OFF_MARK_SEQ).store(seq, Relaxed);
    if req.app_consistent {
        shm.header_u64(OFF_MARK_APP).store(0, Relaxed);
    }
    shm.header_u64(OFF_MARK_DONE).store(req.upto, Release);
}
