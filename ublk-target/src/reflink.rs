//! Sharing blocks between files (reflink, `FICLONERANGE`), for undo journals that keep
//! before-images without copying them.
//!
//! XFS (with reflink, the default since xfsprogs 5.1) and btrfs can make a range of one
//! file share the physical blocks of a range of another on the same filesystem; a later
//! write to either copies the block it touches first (copy-on-write), so the other keeps
//! the old contents. Cloning the replica blocks a segment is about to overwrite into
//! its undo file therefore saves their before-images at the cost of a metadata update,
//! where copying reads and writes every byte.
//!
//! Ranges must start on a filesystem block boundary and span whole blocks; XFS and
//! btrfs write back dirty pages of the source range before sharing it, so what is
//! shared is what a read would have returned. Sharing is used only on those two
//! ([`shareable_block`]): other filesystems that take the call behave differently
//! (OpenZFS can refuse blocks still dirty with EAGAIN, and has had clones that stopped
//! short). A journal on another filesystem than the replica is refused (EXDEV):
//! [`is_unsupported`] tells such refusals from real I/O errors.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `statfs.f_type` of XFS and of btrfs (linux/magic.h).
const XFS_MAGIC: u64 = 0x5846_5342;
const BTRFS_MAGIC: u64 = 0x9123_683e;

/// The block size ranges to [`clone_range`] must be aligned to, when `file` is a regular
/// file on XFS or btrfs; `None` elsewhere (a block device, another filesystem).
pub(crate) fn shareable_block(file: &File) -> Option<u64> {
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    // SAFETY: fstatfs only writes into the struct it is given, which outlives the call.
    let stat = unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(file.as_raw_fd(), &mut stat) != 0 {
            return None;
        }
        stat
    };
    let block = stat.f_bsize as u64;
    let shares = matches!(stat.f_type as u64, XFS_MAGIC | BTRFS_MAGIC);
    (shares && block.is_power_of_two() && block >= 512).then_some(block)
}

/// Makes `len` bytes of `dest` at `dest_offset` share the blocks of `src` at
/// `src_offset`. Offsets and `len` must be multiples of [`shareable_block`]; `dest` must be
/// open for writing on the same filesystem.
pub(crate) fn clone_range(
    src: &File,
    src_offset: u64,
    len: u64,
    dest: RawFd,
    dest_offset: u64,
) -> io::Result<()> {
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset,
    };
    // SAFETY: FICLONERANGE reads the struct it is given, which outlives the call; both
    // descriptors are open (the caller owns them for the duration of the call).
    let result = unsafe { libc::ioctl(dest, libc::FICLONERANGE, &range) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `e` from [`clone_range`] means sharing is not possible here (filesystem
/// without reflink, two filesystems, a range it will not take) rather than a failing
/// device: copying is then the way.
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the filesystem cannot share blocks (the test directories here are on ext4
    /// or tmpfs), the refusal is recognised as such; tests/points.rs covers XFS
    /// (`undo_files_share_blocks_where_the_filesystem_can`, run on XFS by the test
    /// command).
    #[test]
    fn refusal_is_recognised_where_sharing_is_impossible() {
        let dir = tempfile::tempdir().unwrap();
        let src = File::create(dir.path().join("a")).unwrap();
        src.set_len(1 << 20).unwrap();
        let src = File::open(dir.path().join("a")).unwrap();
        let dest = File::create(dir.path().join("b")).unwrap();
        let block = shareable_block(&src).unwrap_or(4096);
        match clone_range(&src, 0, block, dest.as_raw_fd(), 0) {
            Ok(()) => assert!(
                shareable_block(&src).is_some(),
                "cloned on an unexpected filesystem"
            ),
            Err(e) => assert!(is_unsupported(&e), "{e}"),
        }
        assert_eq!(shareable_block(&File::open("/dev/null").unwrap()), None);
        let closed = -1;
        let e = clone_range(&src, 0, block, closed, 0).unwrap_err();
        assert!(!is_unsupported(&e), "EBADF is a real error: {e}");
    }
}
