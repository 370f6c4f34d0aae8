//! The producer's half of a digest resync (the handshake is in [`crate::ring::resync`]):
//! which blocks to compare, which ones later writes touched, and the decision per block.
//!
//! Skipping a block is safe only when both hold: the source block (read under the
//! write claim, so no write to it is in flight) equals the replica's digest, and no
//! record after the begin MARK touched the block. The replica digests describe a state
//! holding every record up to the begin MARK and possibly later ones; a later record to
//! an untouched block does not exist, so for such a block the replica state is exactly
//! "every record before the MARK", and equal digests mean the replica already holds the
//! source's bytes. Every other block is re-recorded: the current source bytes under a
//! fresh seq, which overrides whatever the replica holds or will receive before it.

use changelog::digests::{block_count, block_digest, DigestAnswer, DEFAULT_BLOCK_BYTES};

/// Largest block a digest pass uses (and the buffer its reader needs).
pub const MAX_BLOCK_BYTES: u32 = 1 << 20;

/// A block size a pass accepts: a power of two from 4 KiB to [`MAX_BLOCK_BYTES`];
/// anything else falls back to the default.
pub fn usable_block_bytes(requested: u32) -> u32 {
    if requested.is_power_of_two() && (4096..=MAX_BLOCK_BYTES).contains(&requested) {
        requested
    } else {
        DEFAULT_BLOCK_BYTES
    }
}

pub struct DigestPass {
    gen: u64,
    block_bytes: u32,
    device_bytes: u64,
    /// One bit per block touched by a record after the begin MARK.
    touched: Vec<u64>,
    /// The replica's digests, once the consumer delivered them.
    replica: Option<Vec<[u8; 32]>>,
    next_block: u64,
    sent_bytes: u64,
}

impl DigestPass {
    pub fn new(gen: u64, block_bytes: u32, device_bytes: u64) -> DigestPass {
        let blocks = block_count(device_bytes, block_bytes);
        DigestPass {
            gen,
            block_bytes,
            device_bytes,
            touched: vec![0; blocks.div_ceil(64) as usize],
            replica: None,
            next_block: 0,
            sent_bytes: 0,
        }
    }

    pub fn gen(&self) -> u64 {
        self.gen
    }

    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    pub fn waiting_for_digests(&self) -> bool {
        self.replica.is_none()
    }

    /// Remembers that a record after the begin MARK changed `[offset, offset + len)`.
    pub fn touch(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.device_bytes {
            return;
        }
        let block = u64::from(self.block_bytes);
        let last = (offset + len - 1).min(self.device_bytes - 1) / block;
        for b in offset / block..=last {
            self.touched[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn is_touched(&self, block: u64) -> bool {
        self.touched[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Takes the replica's digests if they answer this pass; explains otherwise.
    pub fn accept(&mut self, answer: DigestAnswer) -> Result<(), String> {
        if answer.gen != self.gen
            || answer.block_bytes != self.block_bytes
            || answer.device_bytes != self.device_bytes
        {
            return Err(format!(
                "digests for generation {} ({} blocks of {} bytes over {} bytes) do not answer pass {} ({} bytes over {})",
                answer.gen,
                answer.digests.len(),
                answer.block_bytes,
                answer.device_bytes,
                self.gen,
                self.block_bytes,
                self.device_bytes
            ));
        }
        if answer.digests.len() as u64 != block_count(self.device_bytes, self.block_bytes) {
            return Err("the digest count does not match the device".into());
        }
        self.replica = Some(answer.digests);
        Ok(())
    }

    /// The next block to compare, `(offset, len)`; `None` while waiting for digests or
    /// when every block is done.
    pub fn next(&self) -> Option<(u64, u64)> {
        self.replica.as_ref()?;
        let offset = self.next_block * u64::from(self.block_bytes);
        (offset < self.device_bytes).then(|| {
            (
                offset,
                u64::from(self.block_bytes).min(self.device_bytes - offset),
            )
        })
    }

    /// Decides for the block [`DigestPass::next`] returned, whose source bytes are
    /// `data`, and moves on. Returns whether it must be re-recorded.
    pub fn compare(&mut self, data: &[u8]) -> bool {
        let block = self.next_block;
        let replica = self.replica.as_ref().expect("next() returned a block");
        let differs = self.is_touched(block) || block_digest(data) != replica[block as usize];
        if differs {
            self.sent_bytes += data.len() as u64;
        }
        self.next_block += 1;
        differs
    }

    /// Skips the block [`DigestPass::next`] returned (its read failed: the caller marked
    /// it dirty for the overflow resync instead).
    pub fn skip(&mut self) {
        self.next_block += 1;
    }

    pub fn done_bytes(&self) -> u64 {
        (self.next_block * u64::from(self.block_bytes)).min(self.device_bytes)
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    pub fn finished(&self) -> bool {
        self.replica.is_some() && self.done_bytes() >= self.device_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn digests_of(image: &[u8], block: usize) -> Vec<[u8; 32]> {
        image
            .chunks(block)
            .map(|c| Sha256::digest(c).into())
            .collect()
    }

    #[test]
    fn re_records_differing_and_touched_blocks_only() {
        let block = 4096usize;
        let source: Vec<u8> = (0..10 * block + 100).map(|i| (i / block) as u8).collect();
        let mut replica = source.clone();
        replica[3 * block + 7] ^= 1; // block 3 differs
        replica[10 * block + 50] ^= 1; // the short last block differs
        let mut pass = DigestPass::new(5, block as u32, source.len() as u64);
        assert!(pass.next().is_none(), "nothing before the digests arrive");
        pass.touch(6 * block as u64 + 10, 1); // a write after the MARK: block 6
        pass.accept(DigestAnswer {
            gen: 5,
            block_bytes: block as u32,
            device_bytes: source.len() as u64,
            digests: digests_of(&replica, block),
        })
        .unwrap();
        let mut sent = Vec::new();
        while let Some((offset, len)) = pass.next() {
            let data = &source[offset as usize..(offset + len) as usize];
            if pass.compare(data) {
                sent.push(offset as usize / block);
            }
        }
        assert_eq!(sent, vec![3, 6, 10]);
        assert!(pass.finished());
        assert_eq!(pass.sent_bytes(), 2 * block as u64 + 100);
    }

    #[test]
    fn refuses_digests_of_another_pass() {
        let mut pass = DigestPass::new(5, 4096, 8192);
        let answer = DigestAnswer {
            gen: 4,
            block_bytes: 4096,
            device_bytes: 8192,
            digests: vec![[0; 32]; 2],
        };
        assert!(pass.accept(answer).is_err());
        assert!(pass.waiting_for_digests());
        assert_eq!(usable_block_bytes(3000), DEFAULT_BLOCK_BYTES);
        assert_eq!(usable_block_bytes(8192), 8192);
    }
}
