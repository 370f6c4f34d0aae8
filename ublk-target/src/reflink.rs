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
//! Ranges must start on a filesystem block boundary and span whole blocks; the
//! filesystem writes back dirty pages of the source range before sharing it, so what is
//! shared is what a read would have returned. Other filesystems (ext4, tmpfs), or a
//! journal on another filesystem than the replica, refuse: [`is_unsupported`] tells
//! those refusals from real I/O errors.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// The block size ranges to [`clone_range`] must be aligned to on `file`'s filesystem.
pub(crate) fn block_size(file: &File) -> io::Result<u64> {
    // SAFETY: fstatvfs only writes into the struct it is given, which outlives the call.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::fstatvfs(file.as_raw_fd(), &mut stat) != 0 {
            return Err(io::Error::last_os_error());
        }
        stat
    };
    Ok(stat.f_bsize as u64)
}

/// Makes `len` bytes of `dest` at `dest_offset` share the blocks of `src` at
/// `src_offset`. Offsets and `len` must be multiples of [`block_size`]; `dest` must be
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
    /// or tmpfs), the refusal is recognised as such; tests/reflink.rs covers XFS.
    #[test]
    fn refusal_is_recognised_where_sharing_is_impossible() {
        let dir = tempfile::tempdir().unwrap();
        let src = File::create(dir.path().join("a")).unwrap();
        src.set_len(1 << 20).unwrap();
        let src = File::open(dir.path().join("a")).unwrap();
        let dest = File::create(dir.path().join("b")).unwrap();
        let block = block_size(&src).unwrap();
        assert!(block.is_power_of_two() && block >= 512, "{block}");
        match clone_range(&src, 0, block, dest.as_raw_fd(), 0) {
            Ok(()) => {} // a reflink filesystem: nothing to check here
            Err(e) => assert!(is_unsupported(&e), "{e}"),
        }
        let closed = -1;
        let e = clone_range(&src, 0, block, closed, 0).unwrap_err();
        assert!(!is_unsupported(&e), "EBADF is a real error: {e}");
    }
}
