//! Synchronous file I/O through io_uring, shared by capture, staging and apply.
//!
//! Every call submits its operations and waits for all of them before returning, so
//! the buffers lent to the kernel outlive their operations by construction: that is the
//! contract that makes the `unsafe` pushes below sound. A batch keeps up to the ring's
//! depth of independent operations in flight; callers order dependent operations by
//! putting them in separate batches.

use io_uring::{opcode, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// One operation of a [`Uring::run_batch`].
#[derive(Clone, Copy, Debug)]
pub enum IoOp<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    /// `fallocate(2)` with `mode` (e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
    },
}

pub struct Uring {
    ring: IoUring,
    depth: usize,
}

impl Uring {
    pub fn new(depth: u32) -> io::Result<Uring> {
        Ok(Uring {
            ring: IoUring::new(depth)?,
            depth: depth as usize,
        })
    }

    /// Writes all of `data` at `offset`, resubmitting after short writes.
    pub fn write_all_at(&mut self, fd: RawFd, data: &[u8], offset: u64) -> io::Result<()> {
        self.run_batch(fd, [IoOp::Write { offset, data }])
    }

    /// Reads exactly `buf.len()` bytes at `offset`; `UnexpectedEof` at end of file.
    pub fn read_exact_at(&mut self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let entry = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .build();
            // SAFETY: `rest` stays borrowed until `complete_one` has reaped this entry.
            let n = unsafe { self.complete_one(entry)? };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }

    /// Fills each buffer from its file offset; bytes past the end of the file read as
    /// zeroes. What the page cache holds is copied right away (`preadv2` with
    /// `RWF_NOWAIT`); the rest is read through the ring, up to its depth in flight, so
    /// reads that wait for a device overlap. On a file system without non-blocking reads
    /// (tmpfs, which has no device to wait for; some network file systems) each buffer
    /// is read with a plain `pread`: the ring would hand every read to a worker thread.
    pub fn read_batch_or_zero<'a>(
        &mut self,
        fd: RawFd,
        ops: impl IntoIterator<Item = (u64, &'a mut [u8])>,
    ) -> io::Result<()> {
        let mut pending: Vec<(u64, &'a mut [u8])> = Vec::new();
        let mut nowait = true;
        for (offset, buf) in ops {
            let done = if nowait {
                match pread_nowait(fd, buf, offset) {
                    Ok(n) => n,
                    // Not supported by the file system (or, EINVAL / ENOSYS, by an old
                    // kernel): read the plain way from here on.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                        ) =>
                    {
                        nowait = false;
                        0
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                }
            } else {
                0
            };
            if !nowait {
                read_or_zero(fd, buf, offset)?;
            } else if done < buf.len() {
                pending.push((offset + done as u64, &mut buf[done..]));
            }
        }
        self.read_batch_in_ring(fd, pending)
    }

    /// [`Uring::read_batch_or_zero`] with every read through the ring.
    fn read_batch_in_ring(&mut self, fd: RawFd, mut ops: Vec<(u64, &mut [u8])>) -> io::Result<()> {
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut first_error: Option<io::Error> = None;
        let mut short: Vec<(usize, usize)> = Vec::new();
        while next < ops.len() || in_flight > 0 {
            while first_error.is_none() && next < ops.len() && in_flight < self.depth {
                let (offset, buf) = &mut ops[next];
                let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
                    .offset(*offset)
                    .build()
                    .user_data(next as u64);
                // SAFETY: the buffers in `ops` are borrowed from the caller for the whole
                // call and not touched here until their entry completes; this loop does
                // not end before every submitted entry has completed (a failed push is
                // recorded, not returned).
                match unsafe { self.push(&entry) } {
                    Ok(()) => {
                        next += 1;
                        in_flight += 1;
                    }
                    Err(e) => first_error = Some(e),
                }
            }
            if in_flight == 0 {
                break;
            }
            self.wait_for_completion()?;
            for cqe in self.ring.completion() {
                in_flight -= 1;
                let i = cqe.user_data() as usize;
                match cqe.result() {
                    r if r < 0 => {
                        first_error.get_or_insert(io::Error::from_raw_os_error(-r));
                    }
                    r if (r as usize) < ops[i].1.len() => short.push((i, r as usize)),
                    _ => {}
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // Short reads: the end of the file, or a read the kernel split.
        for (i, mut done) in short {
            let (offset, buf) = &mut ops[i];
            while done < buf.len() {
                let rest = &mut buf[done..];
                let entry = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), rest.len() as u32)
                    .offset(*offset + done as u64)
                    .build();
                // SAFETY: `rest` stays borrowed until `complete_one` has reaped this entry.
                match unsafe { self.complete_one(entry)? } {
                    0 => {
                        rest.fill(0);
                        break;
                    }
                    n => done += n,
                }
            }
        }
        Ok(())
    }

    /// `fsync(2)` (or `fdatasync(2)` when `data_only`).
    pub fn fsync(&mut self, fd: RawFd, data_only: bool) -> io::Result<()> {
        let flags = if data_only {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let entry = opcode::Fsync::new(types::Fd(fd)).flags(flags).build();
        // SAFETY: fsync lends no buffer.
        unsafe { self.complete_one(entry) }.map(drop)
    }

    /// Runs independent operations with up to the ring depth in flight. On error, waits
    /// for everything already submitted, then returns the first error.
    pub fn run_batch<'a>(
        &mut self,
        fd: RawFd,
        ops: impl IntoIterator<Item = IoOp<'a>>,
    ) -> io::Result<()> {
        let ops: Vec<IoOp<'a>> = ops.into_iter().collect();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut first_error: Option<io::Error> = None;
        let mut retries: Vec<(u64, &'a [u8])> = Vec::new();
        while next < ops.len() || in_flight > 0 {
            while first_error.is_none() && next < ops.len() && in_flight < self.depth {
                let entry = match ops[next] {
                    IoOp::Write { offset, data } => {
                        opcode::Write::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
                            .offset(offset)
                            .build()
                    }
                    IoOp::Fallocate { offset, len, mode } => {
                        opcode::Fallocate::new(types::Fd(fd), len)
                            .offset(offset)
                            .mode(mode)
                            .build()
                    }
                }
                .user_data(next as u64);
                // SAFETY: the buffers in `ops` are borrowed for 'a, which outlives this
                // call, and this loop does not return before every submitted entry
                // has completed.
                unsafe { self.push(&entry)? };
                next += 1;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            self.wait_for_completion()?;
            for cqe in self.ring.completion() {
                in_flight -= 1;
                let op = ops[cqe.user_data() as usize];
                let result = cqe.result();
                if result < 0 {
                    first_error.get_or_insert(io::Error::from_raw_os_error(-result));
                } else if let IoOp::Write { offset, data } = op {
                    if (result as usize) < data.len() {
                        if result == 0 {
                            first_error.get_or_insert(io::ErrorKind::WriteZero.into());
                        } else {
                            retries.push((offset + result as u64, &data[result as usize..]));
                        }
                    }
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        for (offset, rest) in retries {
            self.write_all_at(fd, rest, offset)?;
        }
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion. Retries when a
    /// signal interrupts the wait: returning early would end a batch with operations
    /// still in flight on borrowed buffers.
    fn wait_for_completion(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(drop),
            }
        }
    }

    /// # Safety
    /// Any buffer `entry` points to must stay valid until the entry completes.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        while unsafe { self.ring.submission().push(entry) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Submits one entry and waits for its completion; returns its non-negative result.
    ///
    /// # Safety
    /// Any buffer `entry` points to must stay valid until this returns. No other entry
    /// may be in flight.
    unsafe fn complete_one(&mut self, entry: squeue::Entry) -> io::Result<usize> {
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&entry)? };
        let cqe = loop {
            self.wait_for_completion()?;
            // io_uring_enter may return before the completion is posted; wait again.
            if let Some(cqe) = self.ring.completion().next() {
                break cqe;
            }
        };
        match cqe.result() {
            r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
            r => Ok(r as usize),
        }
    }
}

/// One `preadv2(RWF_NOWAIT)`: what the page cache can give without waiting (`Ok(0)` at
/// the end of the file; `WouldBlock` when nothing is cached there).
fn pread_nowait(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` describes `buf`, which is borrowed mutably for the call.
        let n = unsafe { libc::preadv2(fd, &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Fills `buf` from `offset` with plain `pread`s; bytes past the end read as zeroes.
fn read_or_zero(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is borrowed mutably for the call and `pread` writes at most
        // its length.
        let n = unsafe {
            libc::pread(
                fd,
                rest.as_mut_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => {
                rest.fill(0);
                break;
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writes `bytes` as `dir/name` so that the file either exists complete and durable or
/// not at all: write to a temporary name, fsync, rename, fsync the directory.
pub fn write_file_atomic(
    uring: &mut Uring,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> io::Result<()> {
    let file = AtomicFile::create(dir, name)?;
    uring.write_all_at(file.fd(), bytes, 0)?;
    file.commit(uring)
}

/// A file written piecewise under a temporary name (`dir/.name.tmp`, created empty)
/// and put in place by [`AtomicFile::commit`] complete and durable, as
/// [`write_file_atomic`] does in one call. Dropped before its rename (a write or sync
/// failed, say on a full disk), it removes the temporary file, so a failure leaves no
/// partial file holding space; one left by a crash is truncated by the next create of
/// the same name. Opened for reading too, so a writer can read back what it wrote.
pub struct AtomicFile {
    file: File,
    dir: PathBuf,
    tmp: PathBuf,
    name: String,
    renamed: bool,
}

impl AtomicFile {
    pub fn create(dir: &Path, name: &str) -> io::Result<AtomicFile> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        Ok(AtomicFile {
            file,
            dir: dir.into(),
            tmp,
            name: name.into(),
            renamed: false,
        })
    }

    /// The name a temporary file named `temporary` would have been put in place under
    /// (`None` for other names): for sweeping those a killed writer left.
    pub fn name_of_temporary(temporary: &str) -> Option<&str> {
        temporary.strip_prefix('.')?.strip_suffix(".tmp")
    }

    /// The temporary file's descriptor, to write the contents with.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The temporary file, to read back what was written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's length so far.
    pub fn written_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// fsync, rename to `dir/name`, fsync the directory.
    pub fn commit(mut self, uring: &mut Uring) -> io::Result<()> {
        uring.fsync(self.file.as_raw_fd(), false)?;
        std::fs::rename(&self.tmp, self.dir.join(&self.name))?;
        self.renamed = true;
        sync_dir(uring, &self.dir)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.renamed {
            // Best effort: the error being returned matters more than this one.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn sync_dir(uring: &mut Uring, dir: &Path) -> io::Result<()> {
    let handle = File::open(dir)?;
    uring.fsync(handle.as_raw_fd(), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn batch_write_read_punch() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let fd = file.as_raw_fd();
        let mut uring = Uring::new(4).unwrap();
        let blocks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i + 1; 4096]).collect();
        uring
            .run_batch(
                fd,
                blocks.iter().enumerate().map(|(i, b)| IoOp::Write {
                    offset: i as u64 * 4096,
                    data: b,
                }),
            )
            .unwrap();
        uring.fsync(fd, true).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        uring
            .run_batch(
                fd,
                [IoOp::Fallocate {
                    offset: 4096,
                    len: 4096,
                    mode: punch,
                }],
            )
            .unwrap();
        let mut buf = vec![0u8; 4096];
        for i in 0..10u64 {
            uring.read_exact_at(fd, &mut buf, i * 4096).unwrap();
            let expect = if i == 1 { 0 } else { i as u8 + 1 };
            assert!(buf.iter().all(|&b| b == expect), "block {i}");
        }
        let mut direct = [0u8; 1];
        file.read_exact_at(&mut direct, 9 * 4096).unwrap();
        assert_eq!(direct[0], 10);
        assert_eq!(
            uring
                .read_exact_at(fd, &mut buf, 10 * 4096)
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn read_batch_zeroes_past_the_end() {
        read_batch_in(tempfile::tempdir().unwrap());
        // tmpfs has no non-blocking reads: the plain-pread path.
        if Path::new("/dev/shm").is_dir() {
            read_batch_in(tempfile::tempdir_in("/dev/shm").unwrap());
        }
    }

    fn read_batch_in(dir: tempfile::TempDir) {
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        let mut uring = Uring::new(2).unwrap();
        let mut bufs = vec![
            vec![0xAAu8; 4096],
            vec![0xAA; 3000],
            vec![0xAA; 5000],
            vec![0xAA; 100],
        ];
        let offsets = [0u64, 4096, 8000, 20_000];
        uring
            .read_batch_or_zero(
                file.as_raw_fd(),
                offsets
                    .iter()
                    .copied()
                    .zip(bufs.iter_mut().map(|b| &mut b[..])),
            )
            .unwrap();
        for (offset, buf) in offsets.iter().zip(&bufs) {
            for (i, &b) in buf.iter().enumerate() {
                let at = *offset as usize + i;
                assert_eq!(b, data.get(at).copied().unwrap_or(0), "byte {at}");
            }
        }
    }

    #[test]
    fn atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut uring = Uring::new(2).unwrap();
        write_file_atomic(&mut uring, dir.path(), "a.seg", b"hello").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a.seg")).unwrap(), b"hello");
        assert!(!dir.path().join(".a.seg.tmp").exists());
    }

    #[test]
    fn an_atomic_file_dropped_before_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut uring = Uring::new(2).unwrap();
        let file = AtomicFile::create(dir.path(), "b.undo").unwrap();
        uring.write_all_at(file.fd(), b"half", 0).unwrap();
        assert!(dir.path().join(".b.undo.tmp").exists());
        assert_eq!(AtomicFile::name_of_temporary(".b.undo.tmp"), Some("b.undo"));
        assert_eq!(AtomicFile::name_of_temporary("b.undo"), None);
        drop(file);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
