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
//!
//! A pass covers the whole device, or (restricted) only the blocks an overflow or an
//! unclean stop left in doubt; a write lost to the bitmap there happened before the
//! begin MARK without a record, so the replica lacks it and the block differs. A
//! restricted pass that gets no digests in time re-records all its blocks.

use changelog::digests::{block_count, block_digest, BlockRuns, DigestAnswer, DEFAULT_BLOCK_BYTES};
use std::time::{Duration, Instant};

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

/// One digest pass: over the whole device (a requested resync) or over the blocks an
/// overflow or an unclean stop left in doubt (a *restricted* pass).
pub struct DigestPass {
    gen: u64,
    block_bytes: u32,
    device_bytes: u64,
    /// The blocks compared, and whether they are a restricted set (the request and
    /// answer then list them).
    blocks: BlockRuns,
    restricted: bool,
    /// One bit per block touched by a record after the begin MARK.
    touched: Vec<u64>,
    /// The replica's digests, one per block of `blocks`, once the consumer delivered them.
    replica: Option<Vec<[u8; 32]>>,
    /// No digests came in time: every block is re-recorded without comparing.
    resend_all: bool,
    /// The next block: index into `blocks`' runs, and the block within that run.
    run: usize,
    in_run: u64,
    /// Blocks decided so far (the index of the next one's digest).
    decided: u64,
    done_bytes: u64,
    sent_bytes: u64,
    began: Instant,
}

impl DigestPass {
    /// A pass over the whole device.
    pub fn new(gen: u64, block_bytes: u32, device_bytes: u64) -> DigestPass {
        let blocks = BlockRuns::whole(device_bytes, block_bytes);
        DigestPass::over(gen, block_bytes, device_bytes, blocks, false)
    }

    /// A restricted pass over the blocks the byte `extents` touch.
    pub fn restricted(
        gen: u64,
        block_bytes: u32,
        device_bytes: u64,
        extents: &[(u64, u64)],
    ) -> DigestPass {
        let blocks = BlockRuns::covering(extents, device_bytes, block_bytes);
        DigestPass::over(gen, block_bytes, device_bytes, blocks, true)
    }

    fn over(
        gen: u64,
        block_bytes: u32,
        device_bytes: u64,
        blocks: BlockRuns,
        restricted: bool,
    ) -> DigestPass {
        let all_blocks = block_count(device_bytes, block_bytes);
        DigestPass {
            gen,
            block_bytes,
            device_bytes,
            blocks,
            restricted,
            touched: vec![0; all_blocks.div_ceil(64) as usize],
            replica: None,
            resend_all: false,
            run: 0,
            in_run: 0,
            decided: 0,
            done_bytes: 0,
            sent_bytes: 0,
            began: Instant::now(),
        }
    }

    pub fn gen(&self) -> u64 {
        self.gen
    }

    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    /// The blocks a restricted pass compares (`None` for a whole-device pass).
    pub fn restricted_blocks(&self) -> Option<&BlockRuns> {
        self.restricted.then_some(&self.blocks)
    }

    /// Bytes this pass compares.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.bytes(self.device_bytes, self.block_bytes)
    }

    pub fn waiting_for_digests(&self) -> bool {
        self.replica.is_none() && !self.resend_all
    }

    /// How long the pass has existed.
    pub fn age(&self) -> Duration {
        self.began.elapsed()
    }

    /// Gives up waiting for the replica's digests: every block of the pass is
    /// re-recorded, as a resync without digests does.
    pub fn resend_all(&mut self) {
        self.resend_all = true;
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
            || answer.blocks.as_ref() != self.restricted_blocks()
        {
            return Err(format!(
                "digests for generation {} ({} blocks of {} bytes over {} bytes) do not answer pass {} ({} blocks of {} bytes over {})",
                answer.gen,
                answer.digests.len(),
                answer.block_bytes,
                answer.device_bytes,
                self.gen,
                self.blocks.len(),
                self.block_bytes,
                self.device_bytes
            ));
        }
        if answer.digests.len() as u64 != self.blocks.len() {
            return Err("the digest count does not match the blocks asked for".into());
        }
        self.replica = Some(answer.digests);
        Ok(())
    }

    /// The next block to compare, `(offset, len)`; `None` while waiting for digests or
    /// when every block is done.
    pub fn next(&self) -> Option<(u64, u64)> {
        if self.waiting_for_digests() {
            return None;
        }
        let &(first, _) = self.blocks.runs().get(self.run)?;
        let offset = (first + self.in_run) * u64::from(self.block_bytes);
        Some((
            offset,
            u64::from(self.block_bytes).min(self.device_bytes - offset),
        ))
    }

    fn advance(&mut self, len: u64) {
        self.decided += 1;
        self.done_bytes += len;
        self.in_run += 1;
        if self.in_run == self.blocks.runs()[self.run].1 {
            self.run += 1;
            self.in_run = 0;
        }
    }

    /// Decides for the block [`DigestPass::next`] returned, whose source bytes are
    /// `data`, and moves on. Returns whether it must be re-recorded.
    pub fn compare(&mut self, data: &[u8]) -> bool {
        let (offset, _) = self.next().expect("next() returned a block");
        let block = offset / u64::from(self.block_bytes);
        let differs = self.resend_all || self.is_touched(block) || {
            let replica = self.replica.as_ref().expect("digests arrived");
            block_digest(data) != replica[self.decided as usize]
        };
        if differs {
            self.sent_bytes += data.len() as u64;
        }
        self.advance(data.len() as u64);
        differs
    }

    /// Skips the block [`DigestPass::next`] returned (its read failed: the caller marked
    /// it dirty for the overflow resync instead).
    pub fn skip(&mut self) {
        if let Some((_, len)) = self.next() {
            self.advance(len);
        }
    }

    pub fn done_bytes(&self) -> u64 {
        self.done_bytes
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    pub fn finished(&self) -> bool {
        !self.waiting_for_digests() && self.run >= self.blocks.runs().len()
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
            blocks: None,
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
            blocks: None,
            digests: vec![[0; 32]; 2],
        };
        assert!(pass.accept(answer.clone()).is_err());
        assert!(pass.waiting_for_digests());
        // A whole-device answer does not answer a restricted pass.
        let mut restricted = DigestPass::restricted(4, 4096, 8192, &[(0, 1)]);
        assert!(restricted.accept(answer).is_err());
        assert_eq!(usable_block_bytes(3000), DEFAULT_BLOCK_BYTES);
        assert_eq!(usable_block_bytes(8192), 8192);
    }

    #[test]
    fn a_restricted_pass_compares_only_its_blocks() {
        let block = 4096usize;
        let source: Vec<u8> = (0..10 * block).map(|i| (i / block) as u8 + 1).collect();
        let mut replica = source.clone();
        for b in [1, 4, 8] {
            replica[b * block] ^= 1; // blocks 1, 4 and 8 differ...
        }
        // ...but only blocks 3..=5 and 8 are in doubt (block 1 is not compared).
        let extents = [
            (3 * block as u64 + 5, 2 * block as u64),
            (8 * block as u64, 1),
        ];
        let mut pass = DigestPass::restricted(7, block as u32, source.len() as u64, &extents);
        assert_eq!(pass.total_bytes(), 4 * block as u64);
        let runs = pass.restricted_blocks().unwrap().clone();
        assert_eq!(runs.runs(), &[(3, 3), (8, 1)]);
        pass.touch(5 * block as u64, 1); // written after the MARK
        let digests: Vec<_> = digests_of(&replica, block);
        pass.accept(DigestAnswer {
            gen: 7,
            block_bytes: block as u32,
            device_bytes: source.len() as u64,
            blocks: Some(runs),
            digests: [3, 4, 5, 8].iter().map(|&b| digests[b]).collect(),
        })
        .unwrap();
        let mut sent = Vec::new();
        while let Some((offset, len)) = pass.next() {
            if pass.compare(&source[offset as usize..(offset + len) as usize]) {
                sent.push(offset as usize / block);
            }
        }
        assert_eq!(sent, vec![4, 5, 8]);
        assert!(pass.finished());
        assert_eq!(pass.done_bytes(), 4 * block as u64);
    }

    #[test]
    fn giving_up_on_digests_re_records_every_block() {
        let mut pass = DigestPass::restricted(7, 4096, 10 * 4096, &[(4096, 8192)]);
        assert!(pass.next().is_none());
        pass.resend_all();
        let mut sent = Vec::new();
        while let Some((offset, _)) = pass.next() {
            assert!(pass.compare(&[0; 4096]));
            sent.push(offset / 4096);
        }
        assert_eq!(sent, vec![1, 2]);
        assert!(pass.finished());
    }
}
