//! Futex wait and wake on a word in the shared mapping. Not FUTEX_PRIVATE: the waiter
//! and the waker are different processes, so the kernel must key the futex by the
//! shared page, not by this process's address space.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout`. Returns early on a wake, a
/// signal, or when the word already differs; the caller re-checks its condition.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: timeout.subsec_nanos() as libc::c_long, // < 1e9, fits
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; `ts` lives on
    // our stack; FUTEX_WAIT reads only these. Its errors (EAGAIN, EINTR, ETIMEDOUT) all
    // mean "re-check", which the caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every thread sleeping on `word`, in any process.
pub fn wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE only uses its address as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}
