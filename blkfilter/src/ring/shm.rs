//! The ring file and its mapping: creation, validation of what another process left,
//! the role locks, and typed access to the header words, the bitmap and the data area.

use super::bitmap::DirtyBitmap;
use super::layout::*;
use super::proto::RingMem;
use super::{RingError, RingGeometry};
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{self, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicU64};

/// Which side of the ring a process is; each locks its own byte of the file.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Producer = 0,
    Consumer = 1,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer (blkfilter)",
            Role::Consumer => "consumer (shipper)",
        }
    }
}

/// An open, validated, mapped ring file.
pub struct Shm {
    path: PathBuf,
    geo: RingGeometry,
    layout: Layout,
    /// Covers the whole file; at least `HEADER_BYTES` long once a `Shm` exists.
    map: MmapRaw,
    /// Holds the role lock for as long as the mapping is in use.
    _file: File,
}

pub(super) fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> RingError + 'a {
    move |source| RingError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

impl Shm {
    /// Opens the ring at `path` for the producer, creating it when it does not exist
    /// (or when a creator died before finishing it).
    pub fn create(path: &Path, geo: &RingGeometry) -> Result<Shm, RingError> {
        geo.validate()?;
        let layout = Layout::of(geo).ok_or_else(|| RingError::InvalidGeometry(geo.to_string()))?;
        // 0600: the ring holds the volume's data.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path, "open"))?;
        lock_role(&file, path, Role::Producer)?;
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        // The magic is stored last, so a zero magic in a file of the size we would have
        // made is an interrupted creation; anything else is someone's data, kept.
        let unfinished = len == 0 || (len == layout.file_bytes && read_magic(&file) == Some(0));
        if !unfinished {
            let shm = Shm::validate(path, file, len)?;
            if shm.geo != *geo {
                let (found, wanted) = (shm.geo, *geo);
                return Err(RingError::GeometryMismatch {
                    path: path.to_owned(),
                    found,
                    wanted,
                });
            }
            log::info!(
                "reopened ring {} at position {}",
                path.display(),
                shm.published().load(Relaxed)
            );
            return Ok(shm);
        }
        file.set_len(0).map_err(io_err(path, "truncate"))?;
        allocate(&file, path, layout.file_bytes)?;
        let map = map_populated(&file).map_err(io_err(path, "map"))?;
        let shm = Shm {
            path: path.to_owned(),
            geo: *geo,
            layout,
            map,
            _file: file,
        };
        shm.u32_at(OFF_VERSION).store(VERSION, Relaxed);
        shm.u32_at(OFF_HEADER_BYTES)
            .store(HEADER_BYTES as u32, Relaxed);
        shm.u64_at(OFF_CAPACITY).store(geo.capacity_bytes, Relaxed);
        shm.u64_at(OFF_DEVICE_BYTES)
            .store(geo.device_bytes, Relaxed);
        shm.u32_at(OFF_CHUNK_BYTES).store(geo.chunk_bytes, Relaxed);
        shm.u64_at(OFF_BITMAP_OFFSET)
            .store(layout.bitmap_offset, Relaxed);
        shm.u64_at(OFF_BITMAP_WORDS)
            .store(layout.bitmap_words, Relaxed);
        shm.u64_at(OFF_DATA_OFFSET)
            .store(layout.data_offset, Relaxed);
        shm.u64_at(OFF_NEXT_SEQ).store(FIRST_SEQ, Relaxed);
        // Release: a consumer that sees the magic sees the fields above.
        shm.u64_at(OFF_MAGIC).store(MAGIC, Release);
        log::info!("created ring {} ({geo})", path.display());
        Ok(shm)
    }

    /// Opens an existing ring for the consumer.
    pub fn open(path: &Path) -> Result<Shm, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        lock_role(&file, path, Role::Consumer)?;
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        Shm::validate(path, file, len)
    }

    /// Opens an existing ring without a role: for an operator's control commands
    /// (requesting a resync, reading its progress), which touch only header fields
    /// meant for that.
    pub fn open_unlocked(path: &Path) -> Result<Shm, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        Shm::validate(path, file, len)
    }

    /// Maps `file` and checks its header against the layout rules.
    fn validate(path: &Path, file: File, len: u64) -> Result<Shm, RingError> {
        if len < HEADER_BYTES {
            let why = format!("the file is {len} bytes, shorter than a ring header");
            return Err(RingError::BadMagic {
                path: path.to_owned(),
                why,
            });
        }
        let map = map_populated(&file).map_err(io_err(path, "map"))?;
        let corrupt = |what: String| RingError::CorruptHeader {
            path: path.to_owned(),
            what,
        };
        let magic = u64_in(&map, OFF_MAGIC).load(Acquire);
        if magic != MAGIC {
            let why = match magic {
                0 => "the magic is zero: never initialized".to_string(),
                m => format!("found magic {:02x?}", m.to_le_bytes()),
            };
            return Err(RingError::BadMagic {
                path: path.to_owned(),
                why,
            });
        }
        let version = u32_in(&map, OFF_VERSION).load(Relaxed);
        if version != VERSION {
            let (path, found, supported) = (path.to_owned(), version, VERSION);
            return Err(RingError::UnsupportedVersion {
                path,
                found,
                supported,
            });
        }
        let header_bytes = u32_in(&map, OFF_HEADER_BYTES).load(Relaxed);
        if u64::from(header_bytes) != HEADER_BYTES {
            return Err(corrupt(format!(
                "header size {header_bytes}, expected {HEADER_BYTES}"
            )));
        }
        let geo = RingGeometry {
            capacity_bytes: u64_in(&map, OFF_CAPACITY).load(Relaxed),
            device_bytes: u64_in(&map, OFF_DEVICE_BYTES).load(Relaxed),
            chunk_bytes: u32_in(&map, OFF_CHUNK_BYTES).load(Relaxed),
        };
        geo.validate().map_err(|e| corrupt(e.to_string()))?;
        let layout = Layout::of(&geo).ok_or_else(|| corrupt(geo.to_string()))?;
        let stored = Layout {
            bitmap_offset: u64_in(&map, OFF_BITMAP_OFFSET).load(Relaxed),
            bitmap_words: u64_in(&map, OFF_BITMAP_WORDS).load(Relaxed),
            data_offset: u64_in(&map, OFF_DATA_OFFSET).load(Relaxed),
            file_bytes: len,
        };
        if stored != layout {
            return Err(corrupt(format!(
                "layout {stored:?} does not match {geo} ({layout:?})"
            )));
        }
        let released = u64_in(&map, OFF_RELEASED).load(Acquire);
        let published = u64_in(&map, OFF_PUBLISHED).load(Acquire);
        if released > published
            || published - released > geo.capacity_bytes
            || (released | published) & 7 != 0
        {
            let what =
                format!("positions released {released}, published {published} are inconsistent");
            return Err(corrupt(what));
        }
        Ok(Shm {
            path: path.to_owned(),
            geo,
            layout,
            map,
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geo
    }

    pub fn published(&self) -> &AtomicU64 {
        self.u64_at(OFF_PUBLISHED)
    }

    pub fn released(&self) -> &AtomicU64 {
        self.u64_at(OFF_RELEASED)
    }

    pub fn next_seq(&self) -> &AtomicU64 {
        self.u64_at(OFF_NEXT_SEQ)
    }

    pub fn flags(&self) -> &AtomicU64 {
        self.u64_at(OFF_FLAGS)
    }

    /// The futex word the producer bumps to wake the consumer.
    pub fn wake(&self) -> &AtomicU32 {
        self.u32_at(OFF_WAKE)
    }

    /// How many consumer threads are about to sleep on [`Shm::wake`].
    pub fn waiters(&self) -> &AtomicU32 {
        self.u32_at(OFF_WAITERS)
    }

    /// A header word by its layout offset (`layout::OFF_*`).
    pub fn header_u64(&self, offset: usize) -> &AtomicU64 {
        self.u64_at(offset)
    }

    pub fn header_u32(&self, offset: usize) -> &AtomicU32 {
        self.u32_at(offset)
    }

    pub fn bitmap(&self) -> DirtyBitmap<'_> {
        // SAFETY: validate/create made the file (hence the mapping) layout.file_bytes
        // long, with bitmap_words u64s at the page-aligned bitmap_offset; the mapping is
        // page-aligned and lives as long as &self; every party touches these words only
        // atomically.
        let words = unsafe {
            std::slice::from_raw_parts(
                self.map
                    .as_mut_ptr()
                    .add(self.layout.bitmap_offset as usize)
                    .cast::<AtomicU64>(),
                self.layout.bitmap_words as usize,
            )
        };
        DirtyBitmap {
            words,
            device_bytes: self.geo.device_bytes,
            chunk_bytes: u64::from(self.geo.chunk_bytes),
        }
    }

    /// The data-area bytes `[at, at + len)` as a slice.
    ///
    /// # Safety
    /// The bytes must stay published and unreleased while the slice lives, so the
    /// producer does not write them.
    pub unsafe fn data_slice(&self, at: u64, len: usize) -> &[u8] {
        assert!(
            at + len as u64 <= self.geo.capacity_bytes,
            "data slice out of the ring"
        );
        // SAFETY: in bounds of the data area (just checked), which the mapping covers;
        // unchanged while the slice lives per the caller's contract.
        unsafe { std::slice::from_raw_parts(self.data_ptr().add(at as usize), len) }
    }

    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: data_offset < file length = mapping length (checked in validate/create).
        unsafe { self.map.as_mut_ptr().add(self.layout.data_offset as usize) }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        u64_in(&self.map, offset)
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        u32_in(&self.map, offset)
    }
}

/// The header word at `offset` of a mapped ring file.
/// Maps the whole file with its pages mapped in up front (MAP_POPULATE): a page fault on
/// first touch would otherwise land on the write path of each request, once per page
/// of the ring's first lap.
fn map_populated(file: &File) -> io::Result<MmapRaw> {
    MmapOptions::new().populate().map_raw(file)
}

fn u64_in(map: &MmapRaw, offset: usize) -> &AtomicU64 {
    assert!(offset & 7 == 0 && offset + 8 <= map.len().min(HEADER_BYTES as usize));
    // SAFETY: the mapping is page-aligned and covers the (checked) offset, so this is an
    // aligned, in-bounds u64 that lives as long as the borrow of `map`; header words are
    // only ever accessed atomically, by either process.
    unsafe { &*map.as_mut_ptr().add(offset).cast::<AtomicU64>() }
}

/// The 32-bit header word at `offset` of a mapped ring file.
fn u32_in(map: &MmapRaw, offset: usize) -> &AtomicU32 {
    assert!(offset & 3 == 0 && offset + 4 <= map.len().min(HEADER_BYTES as usize));
    // SAFETY: as for u64_in.
    unsafe { &*map.as_mut_ptr().add(offset).cast::<AtomicU32>() }
}

impl RingMem for Shm {
    fn capacity(&self) -> u64 {
        self.geo.capacity_bytes
    }

    fn load_published(&self, order: Ordering) -> u64 {
        self.published().load(order)
    }

    fn store_published(&self, pos: u64, order: Ordering) {
        self.published().store(pos, order)
    }

    fn load_released(&self, order: Ordering) -> u64 {
        self.released().load(order)
    }

    fn fetch_max_released(&self, pos: u64, order: Ordering) -> u64 {
        self.released().fetch_max(pos, order)
    }

    unsafe fn write(&self, at: u64, src: &[u8]) {
        // A cheap fence against a protocol bug writing outside the data area.
        assert!(
            at + src.len() as u64 <= self.geo.capacity_bytes,
            "ring write out of bounds"
        );
        // SAFETY: in bounds (checked); the caller owns these bytes per RingMem::write.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data_ptr().add(at as usize), src.len())
        }
    }

    unsafe fn read(&self, at: u64, dst: &mut [u8]) {
        assert!(
            at + dst.len() as u64 <= self.geo.capacity_bytes,
            "ring read out of bounds"
        );
        // SAFETY: in bounds (checked); nobody writes these bytes per RingMem::read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.data_ptr().add(at as usize),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }
}

/// The first 8 bytes of `file` as a little-endian u64, `None` if unreadable.
fn read_magic(file: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 0).ok()?;
    Some(u64::from_le_bytes(b))
}

/// Sizes the file and reserves its blocks now: touching an unbacked page of a full
/// tmpfs later would kill the process with SIGBUS instead of giving an error.
fn allocate(file: &File, path: &Path, len: u64) -> Result<(), RingError> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| RingError::InvalidGeometry(format!("{len} bytes")))?;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(io_err(path, "allocate (is the file system full?)")(
            io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

/// Takes the write lock on `role`'s byte of the file. An open-file-description lock:
/// tied to this open file, released by the kernel when the process dies, and (unlike a
/// whole-file flock) leaves the other role's byte free.
fn lock_role(file: &File, path: &Path, role: Role) -> Result<(), RingError> {
    // SAFETY: `flock` is a plain C struct for which all-zero is a valid value (l_pid
    // must be 0 for OFD locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = role as libc::off_t;
    lock.l_len = 1;
    // A lock just released can look held for a moment: a process that forks while it
    // holds the file (std::process::Command in a multi-threaded program) shares the
    // open file description, and so the lock, until the child execs. Retry briefly so
    // that window is not reported as a second producer or consumer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    loop {
        // SAFETY: fcntl with F_OFD_SETLK reads the struct we pass; the fd is ours.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Some(libc::EAGAIN | libc::EACCES) => {
                return Err(RingError::Busy {
                    path: path.to_owned(),
                    role: role.name(),
                })
            }
            _ => return Err(io_err(path, "lock")(err)),
        }
    }
}
