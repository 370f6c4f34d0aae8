//! Seeded synthetic workloads that drive the capture path without a ublk device.
//!
//! Used by `blkfilter exercise` (demo and benchmarks on hosts without ublk), by the
//! end-to-end tests and the benchmarks. A workload is a deterministic function of its
//! seed: writes of 512 B to 1 MiB at 512-aligned random offsets (overwriting each
//! other on a small volume), flushes, FUA writes, discards, write-zeroes and marks.
//! Write data is half-compressible: random bytes alternating with runs of one byte.

/// splitmix64: a tiny, well-distributed generator; enough for workloads.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with half-compressible data: 64-byte random blocks alternate with
    /// 64-byte runs of a single byte, so lz4 shrinks it to about half.
    pub fn fill_half_compressible(&mut self, buf: &mut [u8]) {
        for (i, chunk) in buf.chunks_mut(64).enumerate() {
            if i % 2 == 0 {
                for b in chunk.chunks_mut(8) {
                    let r = self.next_u64().to_le_bytes();
                    b.copy_from_slice(&r[..b.len()]);
                }
            } else {
                chunk.fill(self.next_u64() as u8);
            }
        }
    }
}

/// One operation of a workload, owning its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkOp {
    Write { offset: u64, data: Vec<u8> },
    Fua { offset: u64, data: Vec<u8> },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Mark { label: String },
}

impl WorkOp {
    pub fn as_request(&self) -> crate::capture::Request<'_> {
        use crate::capture::Request;
        match self {
            WorkOp::Write { offset, data } => Request::Write {
                offset: *offset,
                data,
            },
            WorkOp::Fua { offset, data } => Request::Fua {
                offset: *offset,
                data,
            },
            WorkOp::Flush => Request::Flush,
            WorkOp::Discard { offset, len } => Request::Discard {
                offset: *offset,
                len: *len,
            },
            WorkOp::WriteZeroes { offset, len } => Request::WriteZeroes {
                offset: *offset,
                len: *len,
            },
            WorkOp::Mark { label } => Request::Mark {
                label,
                app_consistent: false,
            },
        }
    }
}

/// An endless random workload over a volume of `volume_bytes` (a multiple of 512).
pub struct Workload {
    rng: Rng,
    volume_bytes: u64,
    max_io_bytes: u64,
    count: u64,
}

impl Workload {
    pub fn new(seed: u64, volume_bytes: u64) -> Workload {
        assert!(volume_bytes >= 4096 && volume_bytes % 512 == 0);
        Workload {
            rng: Rng::new(seed),
            volume_bytes,
            max_io_bytes: (1 << 20).min(volume_bytes),
            count: 0,
        }
    }

    /// Largest single I/O (default 1 MiB).
    pub fn with_max_io(mut self, bytes: u64) -> Workload {
        self.max_io_bytes = bytes.clamp(512, self.volume_bytes) / 512 * 512;
        self
    }

    /// A random 512-aligned range of 512 B up to the max I/O size: 60% up to 8 KiB,
    /// 30% up to 128 KiB, 10% up to the max, like a mixed file-system workload.
    fn range(&mut self) -> (u64, u64) {
        let class_max = match self.rng.below(10) {
            0..=5 => 8 << 10,
            6..=8 => 128 << 10,
            _ => self.max_io_bytes,
        };
        let sectors = 1 + self.rng.below(class_max.min(self.max_io_bytes) / 512);
        let len = sectors * 512;
        let offset = self.rng.below((self.volume_bytes - len) / 512 + 1) * 512;
        (offset, len)
    }
}

impl Iterator for Workload {
    type Item = WorkOp;

    fn next(&mut self) -> Option<WorkOp> {
        self.count += 1;
        let roll = self.rng.below(100);
        Some(match roll {
            0..=74 => {
                let (offset, len) = self.range();
                let mut data = vec![0u8; len as usize];
                self.rng.fill_half_compressible(&mut data);
                if roll < 70 {
                    WorkOp::Write { offset, data }
                } else {
                    WorkOp::Fua { offset, data }
                }
            }
            75..=84 => WorkOp::Flush,
            85..=90 => {
                let (offset, len) = self.range();
                WorkOp::Discard { offset, len }
            }
            91..=97 => {
                let (offset, len) = self.range();
                WorkOp::WriteZeroes { offset, len }
            }
            _ => WorkOp::Mark {
                label: format!("mark-{}", self.count),
            },
        })
    }
}
