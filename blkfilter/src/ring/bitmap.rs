//! The dirty bitmap: one bit per `chunk_bytes` of the device, set for regions whose
//! writes did not fit in the ring. The producer ORs bits in; the consumer swaps whole
//! words to zero, so a bit set concurrently is either taken now or stays for next time.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed};

/// The bitmap words of a ring, with the geometry needed to map bits to bytes.
pub struct DirtyBitmap<'a> {
    pub words: &'a [AtomicU64],
    pub device_bytes: u64,
    pub chunk_bytes: u64,
}

impl DirtyBitmap<'_> {
    fn chunks(&self) -> u64 {
        self.device_bytes.div_ceil(self.chunk_bytes)
    }

    /// Sets the bits of every chunk touching `[offset, offset + len)`; the part past the
    /// end of the device is ignored.
    pub fn mark(&self, offset: u64, len: u64) {
        let chunks = self.chunks();
        let first = offset / self.chunk_bytes;
        if len == 0 || first >= chunks {
            return;
        }
        let last = (offset.saturating_add(len - 1) / self.chunk_bytes).min(chunks - 1);
        let mut chunk = first;
        while chunk <= last {
            let word = chunk / 64;
            let lo = chunk % 64;
            let hi = (last - word * 64).min(63);
            // Bits lo..=hi of this word.
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            // Relaxed: the caller's Release store of the OVERFLOW flag publishes the bits.
            self.words[word as usize].fetch_or(mask, Relaxed);
            chunk = (word + 1) * 64;
        }
    }

    /// Clears every bit and returns the byte extents they covered, merged and in order.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            // Skip clean words without writing to them: most of a large bitmap is clean.
            if word.load(Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Acquire);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = (w as u64 * 64 + bit) * self.chunk_bytes;
                let end = (start + self.chunk_bytes).min(self.device_bytes);
                if start >= end {
                    continue; // A bit past the device end: only a corrupt ring has one.
                }
                match extents.last_mut() {
                    Some((off, len)) if *off + *len == start => *len += end - start,
                    _ => extents.push((start, end - start)),
                }
            }
        }
        extents
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(words: &[AtomicU64], device_bytes: u64) -> DirtyBitmap<'_> {
        DirtyBitmap {
            words,
            device_bytes,
            chunk_bytes: 4096,
        }
    }

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn marks_cover_and_merge() {
        let w = words(3);
        let b = bitmap(&w, 4096 * 150);
        b.mark(100, 1); // chunk 0
        b.mark(4096 * 2, 4096); // chunk 2 exactly
        b.mark(4096 * 3 - 1, 2); // chunks 2 and 3
        b.mark(4096 * 60, 4096 * 10); // chunks 60..=69, across a word boundary
        b.mark(4096 * 70, 0); // nothing
        assert_eq!(
            b.take(),
            vec![(0, 4096), (4096 * 2, 4096 * 2), (4096 * 60, 4096 * 10)]
        );
        assert_eq!(b.take(), vec![]);
    }

    #[test]
    fn clamps_at_device_end() {
        let w = words(1);
        // 10 chunks, the last one half-sized.
        let b = bitmap(&w, 4096 * 9 + 2048);
        b.mark(4096 * 8, u64::MAX); // runs far past the end
        b.mark(4096 * 100, 4096); // entirely past the end
        assert_eq!(b.take(), vec![(4096 * 8, 4096 + 2048)]);
        assert_eq!(w[0].load(Relaxed), 0);
    }

    #[test]
    fn whole_words() {
        let w = words(4);
        let b = bitmap(&w, 4096 * 256);
        b.mark(0, 4096 * 256);
        assert!(w.iter().all(|x| x.load(Relaxed) == u64::MAX));
        assert_eq!(b.take(), vec![(0, 4096 * 256)]);
    }
}
