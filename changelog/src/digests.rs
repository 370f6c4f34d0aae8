//! Block digests for resync: the exchange between the protected side (which asks) and
//! the recovery side (which answers with the SHA-256 of every fixed-size block of its
//! replica), through the target store.
//!
//! * A [`DigestRequest`] is stored as `<volume>/digests-<gen:016x>.req` (plain JSON: it
//!   holds only sizes and seqs). `gen` is the seq of the producer's resync-begin MARK.
//! * The recovery side answers once its replica holds every record with seq at or below
//!   `need_seq` (so the digests describe a replica at least that new), with a
//!   [`DigestAnswer`] stored as `<volume>/digests-<gen:016x>.ans`, sealed with
//!   AES-256-GCM under a key derived from the volume key: the store is untrusted, and
//!   digests of plaintext blocks would let it confirm guesses about the data.
//!
//! Block `i` covers `[i * block_bytes, min((i + 1) * block_bytes, device_bytes))`;
//! bytes a replica file does not have (it is shorter than the device) read as zeroes.
//!
//! A request covers the whole device, or only the [`BlockRuns`] it lists (the regions
//! an overflow or an unclean stop left in doubt); its answer then holds one digest per
//! listed block, in order.

use crate::error::{Error, Result};
use crate::key::{Key, KEY_LEN};
use crate::uring::Uring;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::fd::AsRawFd;

/// The default resync block size.
pub const DEFAULT_BLOCK_BYTES: u32 = 64 * 1024;

/// A request for the replica's block digests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DigestRequest {
    pub gen: u64,
    /// Answer only once every record with a seq up to this one is applied.
    pub need_seq: u64,
    pub block_bytes: u32,
    pub device_bytes: u64,
    /// Only these blocks; `None`: every block of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockRuns>,
    /// The id (hex) of the key to seal the answer with: the asking shipper's sealing
    /// key, which may be newer or older than the recovery side's after a rotation.
    /// `None` (requests from before key rotation): the answerer's sealing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// The replica's digests, one per block asked for, in order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DigestAnswer {
    pub gen: u64,
    pub block_bytes: u32,
    pub device_bytes: u64,
    /// The blocks the request listed; `None`: every block.
    pub blocks: Option<BlockRuns>,
    pub digests: Vec<[u8; 32]>,
}

/// A set of blocks as runs `(first block, count)`: sorted, disjoint, not touching, no
/// empty run. Built by [`BlockRuns::covering`] or checked by [`BlockRuns::check`], so a
/// request read from the untrusted store cannot make the answer absurd.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockRuns(Vec<(u64, u64)>);

impl BlockRuns {
    /// Every block of a device.
    pub fn whole(device_bytes: u64, block_bytes: u32) -> BlockRuns {
        let blocks = block_count(device_bytes, block_bytes);
        BlockRuns(if blocks == 0 {
            vec![]
        } else {
            vec![(0, blocks)]
        })
    }

    /// The blocks that byte extents `(offset, len)` (sorted or not) touch, clipped to
    /// the device.
    pub fn covering(extents: &[(u64, u64)], device_bytes: u64, block_bytes: u32) -> BlockRuns {
        let block = u64::from(block_bytes);
        let mut spans: Vec<(u64, u64)> = extents
            .iter()
            .filter(|&&(offset, len)| len > 0 && offset < device_bytes)
            .map(|&(offset, len)| {
                let end = offset.saturating_add(len).min(device_bytes);
                (offset / block, (end - 1) / block + 1)
            })
            .collect();
        spans.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (first, end) in spans {
            match runs.last_mut() {
                Some((f, n)) if *f + *n >= first => *n = (*n).max(end - *f),
                _ => runs.push((first, end - first)),
            }
        }
        BlockRuns(runs)
    }

    /// Checks runs from elsewhere against a device of `blocks` blocks.
    pub fn check(self, blocks: u64) -> std::result::Result<BlockRuns, String> {
        let mut end = 0;
        for (i, &(first, count)) in self.0.iter().enumerate() {
            if count == 0 || (i > 0 && first <= end) || first.saturating_add(count) > blocks {
                return Err(format!(
                    "block run {i} ({first}, {count}) is empty, out of order or past block {blocks}"
                ));
            }
            end = first + count;
        }
        Ok(self)
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Number of blocks in the set.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|r| r.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes the set covers on a device (the last block may be short).
    pub fn bytes(&self, device_bytes: u64, block_bytes: u32) -> u64 {
        let block = u64::from(block_bytes);
        self.0
            .iter()
            .map(|&(first, count)| ((first + count) * block).min(device_bytes) - first * block)
            .sum()
    }
}

pub fn request_name(gen: u64) -> String {
    format!("digests-{gen:016x}.req")
}

pub fn answer_name(gen: u64) -> String {
    format!("digests-{gen:016x}.ans")
}

/// Parses a request blob name back into its generation.
pub fn parse_request_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("digests-")?.strip_suffix(".req")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// Number of blocks of a device.
pub fn block_count(device_bytes: u64, block_bytes: u32) -> u64 {
    device_bytes.div_ceil(u64::from(block_bytes))
}

/// The SHA-256 of one block. All-zero blocks (unwritten space, the common case in an
/// initial replication) are recognised first, which is several times faster than
/// hashing them; their digest is computed once per length.
pub fn block_digest(data: &[u8]) -> [u8; 32] {
    let zero = data
        .chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    if !zero {
        return Sha256::digest(data).into();
    }
    thread_local! {
        static ZERO: std::cell::RefCell<Option<(usize, [u8; 32])>> = const { std::cell::RefCell::new(None) };
    }
    ZERO.with(|cached| {
        let mut cached = cached.borrow_mut();
        match *cached {
            Some((len, digest)) if len == data.len() => digest,
            _ => {
                let digest: [u8; 32] = Sha256::digest(data).into();
                *cached = Some((data.len(), digest));
                digest
            }
        }
    })
}

/// SHA-256 of every block of `file` (zero-extended to `device_bytes`). A reader thread
/// reads ahead with io_uring into one of two buffers while this thread hashes the
/// other, so reading costs (almost) no hashing time. `progress` gets the bytes done.
pub fn file_digests(
    file: &File,
    device_bytes: u64,
    block_bytes: u32,
    progress: impl FnMut(u64),
) -> std::io::Result<Vec<[u8; 32]>> {
    let whole = BlockRuns::whole(device_bytes, block_bytes);
    file_digests_of(file, device_bytes, block_bytes, &whole, progress)
}

/// [`file_digests`] of the blocks in `blocks` only, in order; `progress` gets the
/// bytes of them done.
pub fn file_digests_of(
    file: &File,
    device_bytes: u64,
    block_bytes: u32,
    blocks: &BlockRuns,
    mut progress: impl FnMut(u64),
) -> std::io::Result<Vec<[u8; 32]>> {
    if block_bytes == 0 {
        return Err(std::io::Error::other("block size 0"));
    }
    let file_len = file.metadata()?.len().min(device_bytes);
    let block = u64::from(block_bytes);
    // Whole blocks per read, about 4 MiB.
    let piece = ((4 << 20) / block * block).max(block);
    // Byte spans to read: each run, cut into pieces.
    let spans = blocks.runs().iter().flat_map(|&(first, count)| {
        let end = ((first + count) * block).min(device_bytes);
        (first * block..end)
            .step_by(piece as usize)
            .map(move |at| (at, piece.min(end - at)))
    });
    let mut digests = Vec::with_capacity(blocks.len() as usize);
    let mut done = 0;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(1);
    let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        empty_tx
            .send(vec![0u8; piece as usize])
            .expect("receiver alive");
    }
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut uring = match Uring::new(2) {
                Ok(u) => u,
                Err(e) => return drop(full_tx.send(Err(e))),
            };
            for (at, n) in spans {
                let Ok(mut buf) = empty_rx.recv() else { return };
                buf.resize(n as usize, 0);
                let readable = file_len.saturating_sub(at).min(n) as usize;
                buf[readable..].fill(0);
                let read = match readable {
                    0 => Ok(()),
                    _ => uring.read_exact_at(file.as_raw_fd(), &mut buf[..readable], at),
                };
                if full_tx.send(read.map(|()| buf)).is_err() {
                    return;
                }
            }
        });
        for piece in full_rx {
            let buf = piece?;
            digests.extend(buf.chunks(block as usize).map(block_digest));
            done += buf.len() as u64;
            progress(done);
            let _ = empty_tx.send(buf);
        }
        Ok(digests)
    })
}

/// The key blobs are sealed with: derived from the volume key, so blob nonces can never
/// collide with segment nonces.
fn blob_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    let derived = Sha256::new()
        .chain_update(b"ublk-dr blob key v1")
        .chain_update(key)
        .finalize();
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &derived).expect("32-byte key"))
}

const BLOB_MAGIC: &[u8; 8] = b"UDRBLOB1";

/// Seals `plain` for the untrusted store: magic, random nonce, ciphertext, tag. `aad`
/// binds it to its purpose (e.g. the volume and generation), so a blob cannot be passed
/// off as another.
pub fn seal_blob(key: &Key, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    let nonce: [u8; NONCE_LEN] = crate::key::random_bytes()?;
    let mut out = Vec::with_capacity(plain.len() + 64);
    out.extend_from_slice(BLOB_MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = blob_key(key.bytes())
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[BLOB_MAGIC.len() + NONCE_LEN..],
        )
        .map_err(|_| Error::TooLarge {
            what: "AES-GCM refused the blob length".into(),
        })?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens a blob sealed by [`seal_blob`] with one of `key`'s keys and the same `aad`.
/// Blobs do not name their key: each is tried, the sealing one first (a failed tag
/// check costs one pass over the blob). The last key tried opens `bytes` in place; the
/// ones before it a copy (a failed open leaves its buffer undefined), so a one-key file
/// copies nothing.
pub fn open_blob(key: &Key, aad: &[u8], name: &str, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let head = BLOB_MAGIC.len() + NONCE_LEN;
    if bytes.len() < head + 16 || &bytes[..BLOB_MAGIC.len()] != BLOB_MAGIC {
        return Err(Error::Corrupt {
            segment: name.into(),
            what: "not a sealed ublk-dr blob".into(),
        });
    }
    let nonce: [u8; NONCE_LEN] = bytes[BLOB_MAGIC.len()..head].try_into().expect("12");
    let open = |candidate: &[u8; KEY_LEN], sealed: &mut [u8]| {
        blob_key(candidate)
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed)
            .map(|plain| plain.len())
    };
    let mut candidates = key.newest_first().peekable();
    while let Some(candidate) = candidates.next() {
        if candidates.peek().is_some() {
            let mut sealed = bytes[head..].to_vec();
            if let Ok(plain_len) = open(candidate, &mut sealed) {
                sealed.truncate(plain_len);
                return Ok(sealed);
            }
        } else if let Ok(plain_len) = open(candidate, &mut bytes[head..]) {
            bytes.copy_within(head..head + plain_len, 0);
            bytes.truncate(plain_len);
            return Ok(bytes);
        }
    }
    Err(Error::Auth {
        segment: name.into(),
    })
}

fn answer_aad(volume: &str, gen: u64) -> Vec<u8> {
    format!("ublk-dr digest answer v1 {volume} {gen:016x}").into_bytes()
}

impl DigestAnswer {
    pub fn seal(&self, key: &Key, volume: &str) -> Result<Vec<u8>> {
        let plain = bincode::serialize(self).expect("answer serializes");
        seal_blob(key, &answer_aad(volume, self.gen), &plain)
    }

    /// Opens and checks an answer for request `gen`: authentic, for this volume and
    /// generation, and with one digest per block.
    pub fn open(key: &Key, volume: &str, gen: u64, name: &str, bytes: Vec<u8>) -> Result<Self> {
        let plain = open_blob(key, &answer_aad(volume, gen), name, bytes)?;
        let corrupt = |what: String| Error::Corrupt {
            segment: name.into(),
            what,
        };
        let answer: DigestAnswer =
            bincode::deserialize(&plain).map_err(|e| corrupt(e.to_string()))?;
        if answer.gen != gen || answer.block_bytes == 0 {
            return Err(corrupt(format!("answers generation {:016x}", answer.gen)));
        }
        let blocks = match &answer.blocks {
            Some(runs) => runs.len(),
            None => block_count(answer.device_bytes, answer.block_bytes),
        };
        if answer.digests.len() as u64 != blocks {
            return Err(corrupt(format!(
                "{} digests for {blocks} blocks",
                answer.digests.len()
            )));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_round_trip_and_refusals() {
        let key = Key::from_bytes([7; 32]);
        let answer = DigestAnswer {
            gen: 9,
            block_bytes: 4096,
            device_bytes: 3 * 4096 + 1,
            blocks: None,
            digests: vec![[1; 32]; 4],
        };
        let sealed = answer.seal(&key, "vol").unwrap();
        assert_eq!(
            DigestAnswer::open(&key, "vol", 9, "a", sealed.clone()).unwrap(),
            answer
        );
        // Another generation, volume or key, or a flipped bit: refused.
        assert!(DigestAnswer::open(&key, "vol", 8, "a", sealed.clone()).is_err());
        assert!(DigestAnswer::open(&key, "other", 9, "a", sealed.clone()).is_err());
        let wrong = Key::from_bytes([8; 32]);
        assert!(DigestAnswer::open(&wrong, "vol", 9, "a", sealed.clone()).is_err());
        let mut flipped = sealed.clone();
        let last = flipped.len() - 20;
        flipped[last] ^= 1;
        assert!(DigestAnswer::open(&key, "vol", 9, "a", flipped).is_err());
        // Blobs do not name their key: a file holding it, retired or sealing, opens it.
        for keys in [vec![[7; 32], [8; 32]], vec![[8; 32], [7; 32]]] {
            let rotated = Key::from_keys(keys);
            assert_eq!(
                DigestAnswer::open(&rotated, "vol", 9, "a", sealed.clone()).unwrap(),
                answer
            );
        }
        let others = Key::from_keys(vec![[8; 32], [9; 32]]);
        assert!(DigestAnswer::open(&others, "vol", 9, "a", sealed).is_err());
    }

    #[test]
    fn file_digests_zero_extend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 5000]).unwrap();
        let file = File::open(&path).unwrap();
        let digests = file_digests(&file, 3 * 4096, 4096, |_| {}).unwrap();
        let mut second = vec![5u8; 5000 - 4096];
        second.resize(4096, 0);
        assert_eq!(
            digests,
            vec![
                <[u8; 32]>::from(Sha256::digest([5u8; 4096])),
                Sha256::digest(&second).into(),
                Sha256::digest([0u8; 4096]).into()
            ]
        );
        assert_eq!(parse_request_name(&request_name(77)), Some(77));
        // Only blocks 0 and 2, in order.
        let runs = BlockRuns::covering(&[(9000, 10), (100, 1)], 3 * 4096, 4096);
        assert_eq!(runs.runs(), &[(0, 1), (2, 1)]);
        let some = file_digests_of(&file, 3 * 4096, 4096, &runs, |_| {}).unwrap();
        assert_eq!(some, vec![digests[0], digests[2]]);
    }

    #[test]
    fn block_runs_cover_merge_and_check() {
        let block = 4096;
        let size = 10 * 4096 + 100;
        // Overlapping, touching and unsorted extents merge; the tail clips to the device.
        let runs = BlockRuns::covering(
            &[
                (8192, 4096),
                (0, 1),
                (4096, 1),
                (5 * 4096 + 1, 8192),
                (10 * 4096, 1 << 20),
            ],
            size,
            block,
        );
        assert_eq!(runs.runs(), &[(0, 3), (5, 3), (10, 1)]);
        assert_eq!(runs.len(), 7);
        assert_eq!(runs.bytes(size, block), 6 * 4096 + 100);
        assert_eq!(BlockRuns::whole(size, block).runs(), &[(0, 11)]);
        assert!(runs.clone().check(11).is_ok());
        assert!(runs.check(10).is_err(), "past the end");
        assert!(
            BlockRuns(vec![(3, 1), (2, 1)]).check(11).is_err(),
            "out of order"
        );
        assert!(
            BlockRuns(vec![(3, 1), (4, 1)]).check(11).is_err(),
            "touching"
        );
        assert!(BlockRuns(vec![(3, 0)]).check(11).is_err(), "empty");
        assert!(
            BlockRuns(vec![(u64::MAX, 2)]).check(11).is_err(),
            "overflow"
        );
    }
}
